/**
 * The Amperity <-> Braze bridge as one CDK construct: the same resources as `template.yaml`
 * (SAM), for teams that deploy with CDK. Resource ids equal the template's logical ids, props
 * equal its parameters (lower camel case), and `test/parity.test.ts` holds the two to the same
 * functions, triggers, environment, queues, alarms, IAM and checkov skips. Change both together.
 *
 * The functions' code comes prebuilt (`make build`: `cargo lambda build --release --arm64`), from
 * `target/lambda/<function>/` by default, so synthesis never compiles Rust.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';

import * as cdk from 'aws-cdk-lib';
import * as cloudwatch from 'aws-cdk-lib/aws-cloudwatch';
import * as cloudwatchActions from 'aws-cdk-lib/aws-cloudwatch-actions';
import * as events from 'aws-cdk-lib/aws-events';
import * as glue from 'aws-cdk-lib/aws-glue';
import * as iam from 'aws-cdk-lib/aws-iam';
import * as lambda from 'aws-cdk-lib/aws-lambda';
import * as logs from 'aws-cdk-lib/aws-logs';
import * as s3 from 'aws-cdk-lib/aws-s3';
import * as scheduler from 'aws-cdk-lib/aws-scheduler';
import * as sns from 'aws-cdk-lib/aws-sns';
import * as sqs from 'aws-cdk-lib/aws-sqs';
import { Construct } from 'constructs';

/**
 * Everything `template.yaml` takes as a parameter, under the same name in lower camel case, plus
 * where the prebuilt function code is. An empty or absent bucket name means "create the bucket";
 * a name means "use this existing bucket" (triggered through EventBridge, so its owner must turn
 * on EventBridge notifications for it).
 */
export interface BrazeBridgeProps {
  /** Existing bucket Amperity exports to; absent: create one. */
  readonly exportsBucketName?: string;
  /** Prefix of the Amperity exports braze-sync reads. @default 'amperity/' */
  readonly exportsPrefix?: string;
  /** Existing bucket for braze-sync state, reports and rejects; absent: create one. */
  readonly stateBucketName?: string;
  /** @default 'bridge/state/' */
  readonly statePrefix?: string;
  /** @default 'bridge/reports/' */
  readonly reportsPrefix?: string;
  /** @default 'bridge/rejects/' */
  readonly rejectsPrefix?: string;
  /** Existing bucket of the route configs; absent: the state bucket. */
  readonly routesBucketName?: string;
  /** @default 'bridge/routes/' */
  readonly routesPrefix?: string;
  /** Existing bucket Braze Currents writes to; absent: create one. */
  readonly currentsBucketName?: string;
  /** @default 'currents/' */
  readonly currentsPrefix?: string;
  /** Existing bucket for the Parquet tables, quarantine and reports; absent: create one. */
  readonly tablesBucketName?: string;
  /** @default 'tables/' */
  readonly tablesPrefix?: string;
  /** @default 'quarantine/' */
  readonly quarantinePrefix?: string;
  /** currents-normalize's REPORTS_PREFIX. @default 'reports/currents/' */
  readonly currentsReportsPrefix?: string;
  /** currents-normalize's STATE_PREFIX (compaction leases and manifests). @default 'state/currents/' */
  readonly currentsStatePrefix?: string;
  /** EventBridge Scheduler expression (UTC) of the daily compaction. @default 'cron(30 1 * * ? *)' */
  readonly compactionSchedule?: string;
  /** Glue database of the Currents tables. @default 'braze_currents' */
  readonly glueDatabaseName?: string;
  /** Braze instance, e.g. 'US-03'. @default 'US-03' */
  readonly brazeInstance?: string;
  /** REST endpoint overriding the instance's. */
  readonly brazeRestEndpoint?: string;
  /** Full ARN of the Secrets Manager secret holding the Braze REST API key. */
  readonly brazeApiKeySecretArn: string;
  /**
   * Fraction (0..1] of the workspace's /users/track rate limit this deployment's runs use together
   * (they split it among themselves); below 1 only when another deployment or tool sends to the
   * same workspace. @default 1
   */
  readonly rateLimitShare?: number;
  /** @default 3000 */
  readonly brazeRateLimitRequests?: number;
  /** @default 3 */
  readonly brazeRateLimitWindowSecs?: number;
  /** 75, or 50 on Braze's combined-limit plan. @default 75 */
  readonly brazeMaxObjectsPerRequest?: number;
  /**
   * /users/track requests this deployment's runs may make together per clock hour (UTC); a run
   * that reaches it hands over until the next hour. 0: no hourly budget. @default 0
   */
  readonly brazeHourlyRequestLimit?: number;
  /** Most braze-sync invocations the SQS trigger runs at once (2..1000). @default 5 */
  readonly brazeSyncMaxConcurrency?: number;
  /** Most currents-normalize invocations the SQS trigger runs at once (2..1000). @default 10 */
  readonly currentsNormalizeMaxConcurrency?: number;
  /** RUST_LOG of both functions. @default 'info' */
  readonly logLevel?: string;
  /** Days CloudWatch Logs keeps the functions' logs. @default 30 */
  readonly logRetentionDays?: logs.RetentionDays;
  /** SNS topic the alarms notify; absent: create one. */
  readonly alarmTopicArn?: string;
  /**
   * Routes (comma-separated) braze-sync audits for drift on `auditSchedule`, as
   * `braze-sync audit ROUTE --sample auditSample` (never --heal); empty: no scheduled audit.
   * The Braze API key then needs the users.export.ids permission too. @default ''
   */
  readonly auditRoutes?: string;
  /** EventBridge Scheduler expression (UTC) of the drift audit. @default 'cron(0 4 ? * MON *)' */
  readonly auditSchedule?: string;
  /** Users sampled per route by the scheduled drift audit (1..100000). @default 1000 */
  readonly auditSample?: number;
  /** The drift alarm goes off above this `drift_share` (0..1). @default 0.01 */
  readonly driftAlarmShare?: number;
  /**
   * braze-sync code: a directory holding `bootstrap` or `bootstrap.zip`, as
   * `cargo lambda build --release --arm64 [--output-format zip]` lays it out.
   * @default '<repo>/target/lambda/braze-sync'
   */
  readonly brazeSyncCodePath?: string;
  /** currents-normalize code, as `brazeSyncCodePath`. @default '<repo>/target/lambda/currents-normalize' */
  readonly currentsNormalizeCodePath?: string;
}

/** The defaults of the optional props; equal to `template.yaml`'s parameter defaults (tested). */
export const BRAZE_BRIDGE_DEFAULTS = {
  exportsBucketName: '',
  exportsPrefix: 'amperity/',
  stateBucketName: '',
  statePrefix: 'bridge/state/',
  reportsPrefix: 'bridge/reports/',
  rejectsPrefix: 'bridge/rejects/',
  routesBucketName: '',
  routesPrefix: 'bridge/routes/',
  currentsBucketName: '',
  currentsPrefix: 'currents/',
  tablesBucketName: '',
  tablesPrefix: 'tables/',
  quarantinePrefix: 'quarantine/',
  currentsReportsPrefix: 'reports/currents/',
  currentsStatePrefix: 'state/currents/',
  compactionSchedule: 'cron(30 1 * * ? *)',
  glueDatabaseName: 'braze_currents',
  brazeInstance: 'US-03',
  brazeRestEndpoint: '',
  rateLimitShare: 1,
  brazeRateLimitRequests: 3000,
  brazeRateLimitWindowSecs: 3,
  brazeMaxObjectsPerRequest: 75,
  brazeHourlyRequestLimit: 0,
  brazeSyncMaxConcurrency: 5,
  currentsNormalizeMaxConcurrency: 10,
  logLevel: 'info',
  logRetentionDays: 30,
  alarmTopicArn: '',
  auditRoutes: '',
  auditSchedule: 'cron(0 4 ? * MON *)',
  auditSample: 1000,
  driftAlarmShare: 0.01,
} as const satisfies Partial<Record<keyof BrazeBridgeProps, string | number>>;

/** The props that mirror a template parameter (all but the code paths). */
export const BRAZE_BRIDGE_PARAMETER_PROPS = [
  ...(Object.keys(BRAZE_BRIDGE_DEFAULTS) as (keyof typeof BRAZE_BRIDGE_DEFAULTS)[]),
  'brazeApiKeySecretArn',
] as const;

/** Memory and timeout of each function; the reasons are beside the values in template.yaml. */
export const FUNCTION_SIZING = {
  // Sized from `make bench` (sync-scale-bench): see README "Sizing guide". Big routes diff range
  // by range, so memory does not grow with the route. 900 s is Lambda's maximum: a run
  // checkpoints and hands over before it. /tmp holds the bounded diff's spill (~357 bytes per
  // export row: 3.6 GB at 10M users) and spilled zip/Parquet parts; see template.yaml.
  brazeSync: { memorySize: 1024, timeoutSeconds: 900, ephemeralStorageMiB: 4096 },
  // Sized from `make bench`: see README. One Avro file (<= ~100k events) decoded at a time.
  currentsNormalize: { memorySize: 1024, timeoutSeconds: 300 },
  // Sized from `make bench`: see README. A table-day's parts are copied to /tmp (4096 MiB) and
  // merged in bounded memory; 900 s is Lambda's maximum (runs stop starting days before it).
  currentsCompact: { memorySize: 2048, timeoutSeconds: 900, ephemeralStorageMiB: 4096 },
} as const;

/** The Glue tables generated from the registry (`cargo run -p harness --bin currents-catalog`). */
interface GeneratedCatalog {
  readonly projectionRange: string;
  readonly tables: {
    readonly logicalId: string;
    readonly name: string;
    readonly description: string;
    readonly columns: { readonly name: string; readonly type: string }[];
  }[];
}
const CATALOG = JSON.parse(
  fs.readFileSync(path.join(__dirname, 'glue-tables.generated.json'), 'utf8'),
) as GeneratedCatalog;

/** A checkov check skipped on one resource, with the reason beside it (as in template.yaml). */
interface CheckovSkip {
  readonly id: string;
  readonly comment: string;
}

const SKIP_ACCESS_LOGS: CheckovSkip = {
  id: 'CKV_AWS_18',
  comment:
    "Server access logs need a separate log bucket; object-level auditing belongs to the account's " +
    'CloudTrail data events, and every run writes its own report object.',
};
const SKIP_DLQ_KMS: CheckovSkip = {
  id: 'CKV_AWS_27',
  comment:
    'Encrypted with SQS-managed SSE (SqsManagedSseEnabled), which checkov does not recognise; it keeps ' +
    'the messages (S3 event notifications, no customer data) encrypted.',
};
const SKIP_QUEUE_KMS: CheckovSkip = {
  id: 'CKV_AWS_27',
  comment:
    'Encrypted with SQS-managed SSE (SqsManagedSseEnabled). A KMS key would need a key policy for S3 and ' +
    'EventBridge (the AWS-managed aws/sqs key cannot grant them, so deliveries would fail); the messages ' +
    'are event notifications, not customer data.',
};
const SKIP_LOG_KMS: CheckovSkip = {
  id: 'CKV_AWS_158',
  comment:
    'CloudWatch Logs encrypts every log group at rest; the functions log counts, keys and errors, never ' +
    'attribute values, event payloads or the API key, so a customer KMS key adds cost and a key policy ' +
    'without protecting more.',
};
const SKIP_RESERVED_CONCURRENCY: CheckovSkip = {
  id: 'CKV_AWS_115',
  comment:
    'Concurrency is capped where it matters, on the SQS trigger (MaximumConcurrency). Reserved concurrency ' +
    'would throttle SQS batches into the DLQ and fails to deploy in accounts with the default low ' +
    'concurrency quota.',
};
const SKIP_VPC: CheckovSkip = {
  id: 'CKV_AWS_117',
  comment:
    "The functions talk only to AWS APIs and Braze's public HTTPS API; a VPC would add a NAT gateway " +
    'and nothing to protect.',
};
const SKIP_ENV_KMS: CheckovSkip = {
  id: 'CKV_AWS_173',
  comment:
    "The environment holds bucket names, prefixes and the secret's ARN, never the API key (read from " +
    'Secrets Manager at start); Lambda encrypts it at rest with its own key.',
};
const SKIP_TOPIC_KMS: CheckovSkip = {
  id: 'CKV_AWS_26',
  comment:
    'Carries only alarm state changes (alarm names and thresholds, no customer data). CloudWatch cannot ' +
    'publish to a topic encrypted with the AWS-managed aws/sns key, and a customer key would need its ' +
    'own key policy for CloudWatch.',
};

const SKIP_COMPACT_CONCURRENCY: CheckovSkip = {
  id: 'CKV_AWS_115',
  comment:
    'Started once a day by its schedule; a per-day lease keeps overlapping runs apart, so reserved ' +
    'concurrency would protect nothing.',
};
const SKIP_VPC_S3_ONLY: CheckovSkip = {
  id: 'CKV_AWS_117',
  comment: 'The function talks only to S3; a VPC would add endpoints or a NAT gateway and nothing to protect.',
};
const SKIP_ENV_PLAIN: CheckovSkip = {
  id: 'CKV_AWS_173',
  comment:
    'The environment holds bucket names and prefixes only, no secrets; Lambda encrypts it at rest with its ' +
    'own key.',
};

function skipCheckov(construct: Construct, ...skips: CheckovSkip[]): void {
  const resource = construct.node.defaultChild as cdk.CfnResource;
  resource.addMetadata('checkov', { skip: skips.map((s) => ({ id: s.id, comment: s.comment })) });
}

/** Where the repository's `target/lambda/` is, seen from this file (infra/lib/). */
const DEFAULT_LAMBDA_ROOT = path.resolve(__dirname, '..', '..', 'target', 'lambda');

/**
 * Lambda code from a `cargo lambda build` output directory: `bootstrap.zip` when the build made
 * zips, else the directory holding `bootstrap`.
 */
export function prebuiltCode(dir: string): lambda.Code {
  const zip = path.join(dir, 'bootstrap.zip');
  if (fs.existsSync(zip)) {
    return lambda.Code.fromAsset(zip);
  }
  if (fs.existsSync(path.join(dir, 'bootstrap'))) {
    return lambda.Code.fromAsset(dir);
  }
  throw new Error(
    `no bootstrap or bootstrap.zip in ${dir}: run \`make build\` first ` +
      '(cargo lambda build --release --arm64 --output-format zip), or pass the code path prop',
  );
}

function checkPrefix(name: string, value: string): void {
  if (!cdk.Token.isUnresolved(value) && !/^[^/].*\/$/.test(value)) {
    throw new Error(`${name} must be a key prefix ending in '/' and not starting with '/', got '${value}'`);
  }
}

function checkRange(name: string, value: number, min: number, max: number): void {
  if (!cdk.Token.isUnresolved(value) && !(value >= min && value <= max)) {
    throw new Error(`${name} must be between ${min} and ${max}, got ${value}`);
  }
}

/** `arn:<partition>:s3:::<bucket>` for a bucket name or token. */
function bucketArn(bucket: string): string {
  return `arn:${cdk.Aws.PARTITION}:s3:::${bucket}`;
}

/** The object ARNs under `prefix` in `bucket`. */
function objectsArn(bucket: string, prefix: string): string {
  return `arn:${cdk.Aws.PARTITION}:s3:::${bucket}/${prefix}*`;
}

/** A unique, lowercase suffix known before any resource exists: the stack id's UUID. */
function stackUuid(): string {
  return cdk.Fn.select(2, cdk.Fn.split('/', cdk.Aws.STACK_ID));
}

/**
 * Both bridge functions with their triggers, queues, dead-letter queues, least-privilege roles,
 * log groups and alarms, plus the buckets that were not given by name.
 */
export class BrazeBridge extends Construct {
  /** braze-sync: Amperity exports -> Braze /users/track. */
  public readonly brazeSyncFunction: lambda.Function;
  /** currents-normalize: Braze Currents Avro -> Parquet tables. */
  public readonly currentsNormalizeFunction: lambda.Function;
  /** The daily compaction (same code, started by EventBridge Scheduler). */
  public readonly currentsCompactFunction: lambda.Function;
  /** The Glue database of the Currents tables. */
  public readonly glueDatabaseName: string;
  /** braze-sync's input queue (also takes replays and its own continuation messages). */
  public readonly brazeSyncQueue: sqs.Queue;
  /** braze-sync's dead-letter queue. */
  public readonly brazeSyncDeadLetterQueue: sqs.Queue;
  /** currents-normalize's input queue. */
  public readonly currentsNormalizeQueue: sqs.Queue;
  /** currents-normalize's dead-letter queue. */
  public readonly currentsNormalizeDeadLetterQueue: sqs.Queue;
  /** Names of the four buckets, created or given. */
  public readonly bucketNames: {
    readonly exports: string;
    readonly state: string;
    readonly routes: string;
    readonly currents: string;
    readonly tables: string;
  };
  /** ARN of the SNS topic the alarms notify. */
  public readonly alarmTopicArn: string;
  /** The operations dashboard (body: `infra/dashboard.json`). */
  public readonly dashboard: cloudwatch.CfnDashboard;
  /** Console URL of the operations dashboard. */
  public readonly dashboardUrl: string;

  constructor(scope: Construct, id: string, props: BrazeBridgeProps) {
    super(scope, id);
    const p = { ...BRAZE_BRIDGE_DEFAULTS, ...definedOnly(props) };
    for (const key of [
      'exportsPrefix',
      'statePrefix',
      'reportsPrefix',
      'rejectsPrefix',
      'routesPrefix',
      'currentsPrefix',
      'tablesPrefix',
      'quarantinePrefix',
      'currentsReportsPrefix',
    ] as const) {
      checkPrefix(key, p[key]);
    }
    checkRange('rateLimitShare', p.rateLimitShare, Number.MIN_VALUE, 1);
    checkRange('brazeMaxObjectsPerRequest', p.brazeMaxObjectsPerRequest, 1, 75);
    checkRange('brazeHourlyRequestLimit', p.brazeHourlyRequestLimit, 0, Number.MAX_SAFE_INTEGER);
    checkRange('auditSample', p.auditSample, 1, 100000);
    checkRange('driftAlarmShare', p.driftAlarmShare, 0, 1);
    if (!cdk.Token.isUnresolved(p.auditRoutes) && !/^([a-z0-9][a-z0-9_-]*(,[a-z0-9][a-z0-9_-]*)*)?$/.test(p.auditRoutes)) {
      throw new Error(`auditRoutes must be route names separated by commas, got ${p.auditRoutes}`);
    }
    checkRange('brazeSyncMaxConcurrency', p.brazeSyncMaxConcurrency, 2, 1000);
    checkRange('currentsNormalizeMaxConcurrency', p.currentsNormalizeMaxConcurrency, 2, 1000);

    // ---------------------------------------------------------------------------------------
    // Queues first: new input buckets notify them, so their policies must exist before.
    // ---------------------------------------------------------------------------------------
    this.brazeSyncDeadLetterQueue = deadLetterQueue(this, 'BrazeSyncDeadLetterQueue');
    this.brazeSyncQueue = inputQueue(
      this,
      'BrazeSyncQueue',
      this.brazeSyncDeadLetterQueue,
      FUNCTION_SIZING.brazeSync.timeoutSeconds,
    );
    this.currentsNormalizeDeadLetterQueue = deadLetterQueue(this, 'CurrentsNormalizeDeadLetterQueue');
    this.currentsNormalizeQueue = inputQueue(
      this,
      'CurrentsNormalizeQueue',
      this.currentsNormalizeDeadLetterQueue,
      FUNCTION_SIZING.currentsNormalize.timeoutSeconds,
    );
    const brazeSyncQueuePolicy = queuePolicy(this, 'BrazeSyncQueuePolicy', this.brazeSyncQueue);
    const currentsQueuePolicy = queuePolicy(this, 'CurrentsNormalizeQueuePolicy', this.currentsNormalizeQueue);

    // ---------------------------------------------------------------------------------------
    // Buckets: created only when no name was given; input buckets trigger their queue either
    // through an S3 notification (new bucket) or an EventBridge rule (existing bucket).
    // ---------------------------------------------------------------------------------------
    const exports = inputBucketTrigger(this, {
      bucketId: 'ExportsBucket',
      ruleId: 'BrazeSyncExportsRule',
      nameStem: 'braze-bridge-exports',
      givenName: p.exportsBucketName,
      prefix: p.exportsPrefix,
      queue: this.brazeSyncQueue,
      queuePolicy: brazeSyncQueuePolicy,
      notificationsSid: 'AllowExportsBucketNotifications',
      ruleSid: 'AllowExportsEventBridgeRule',
      ruleDescription: 'Objects created under the Amperity exports prefix, for braze-sync.',
      targetId: 'braze-sync-queue',
    });
    const state = p.stateBucketName !== '' ? p.stateBucketName : securedBucket(this, 'StateBucket').bucketName;
    const currents = inputBucketTrigger(this, {
      bucketId: 'CurrentsBucket',
      ruleId: 'CurrentsNormalizeCurrentsRule',
      nameStem: 'braze-bridge-currents',
      givenName: p.currentsBucketName,
      prefix: p.currentsPrefix,
      queue: this.currentsNormalizeQueue,
      queuePolicy: currentsQueuePolicy,
      notificationsSid: 'AllowCurrentsBucketNotifications',
      ruleSid: 'AllowCurrentsEventBridgeRule',
      ruleDescription: 'Objects created under the Braze Currents prefix, for currents-normalize.',
      targetId: 'currents-normalize-queue',
    });
    const tables = p.tablesBucketName !== '' ? p.tablesBucketName : securedBucket(this, 'TablesBucket').bucketName;
    const routes = p.routesBucketName !== '' ? p.routesBucketName : state;
    this.bucketNames = { exports, state, routes, currents, tables };

    // ---------------------------------------------------------------------------------------
    // braze-sync
    // ---------------------------------------------------------------------------------------
    const brazeSyncLogGroup = logGroup(this, 'BrazeSyncLogGroup', p.logRetentionDays);
    const brazeSyncRole = functionRole(this, 'BrazeSyncRole', 'braze-sync', [
      new iam.PolicyStatement({
        sid: 'WriteOwnLogs',
        actions: ['logs:CreateLogStream', 'logs:PutLogEvents'],
        resources: [brazeSyncLogGroup.logGroupArn],
      }),
      new iam.PolicyStatement({
        sid: 'ConsumeOwnQueueAndSendContinuations',
        actions: [
          'sqs:ReceiveMessage',
          'sqs:DeleteMessage',
          'sqs:ChangeMessageVisibility',
          'sqs:GetQueueAttributes',
          'sqs:SendMessage',
        ],
        resources: [this.brazeSyncQueue.queueArn],
      }),
      new iam.PolicyStatement({
        sid: 'SendFailedAsyncEventsToDeadLetterQueue',
        actions: ['sqs:SendMessage'],
        resources: [this.brazeSyncDeadLetterQueue.queueArn],
      }),
      new iam.PolicyStatement({
        sid: 'ReadExports',
        actions: ['s3:GetObject'],
        resources: [objectsArn(exports, p.exportsPrefix)],
      }),
      new iam.PolicyStatement({
        sid: 'ListExportFolders',
        actions: ['s3:ListBucket'],
        resources: [bucketArn(exports)],
        conditions: { StringLike: { 's3:prefix': `${p.exportsPrefix}*` } },
      }),
      new iam.PolicyStatement({
        sid: 'ReadRouteConfigs',
        actions: ['s3:GetObject'],
        resources: [objectsArn(routes, p.routesPrefix)],
      }),
      new iam.PolicyStatement({
        sid: 'ListRouteConfigs',
        actions: ['s3:ListBucket'],
        resources: [bucketArn(routes)],
        conditions: { StringLike: { 's3:prefix': `${p.routesPrefix}*` } },
      }),
      // The state is the function's own: a commit deletes what it replaced (folded checkpoint
      // segments, rewritten bases, a format-1 state's shards after its migration), a run its
      // sender lease under _workspace/senders/, a fan-out its control objects under
      // <route>/_fan_out/<run id>/. Without DeleteObject these deletes are refused and the
      // replaced objects pile up.
      new iam.PolicyStatement({
        sid: 'ReadWriteState',
        actions: ['s3:GetObject', 's3:PutObject', 's3:DeleteObject'],
        resources: [objectsArn(state, p.statePrefix)],
      }),
      // Without ListBucket, S3 answers a read of a missing key (a route's first snapshot) with
      // 403 instead of 404; a prefix condition would not cover those reads.
      new iam.PolicyStatement({
        sid: 'ListStateBucket',
        actions: ['s3:ListBucket'],
        resources: [bucketArn(state)],
      }),
      new iam.PolicyStatement({
        sid: 'WriteReportsAndRejects',
        actions: ['s3:PutObject'],
        resources: [objectsArn(state, p.reportsPrefix), objectsArn(state, p.rejectsPrefix)],
      }),
      new iam.PolicyStatement({
        sid: 'ReadBrazeApiKey',
        actions: ['secretsmanager:GetSecretValue'],
        resources: [props.brazeApiKeySecretArn],
      }),
    ]);
    const brazeSyncEnvironment: Record<string, string> = {
      ROUTES_LOCATION: `s3://${routes}/${p.routesPrefix}`,
      STATE_BUCKET: state,
      STATE_PREFIX: p.statePrefix,
      REPORTS_PREFIX: p.reportsPrefix,
      REJECTS_PREFIX: p.rejectsPrefix,
      BRAZE_INSTANCE: p.brazeInstance,
      BRAZE_API_KEY_SECRET_ARN: props.brazeApiKeySecretArn,
      BRAZE_RATE_LIMIT_REQUESTS: String(p.brazeRateLimitRequests),
      BRAZE_RATE_LIMIT_WINDOW_SECS: String(p.brazeRateLimitWindowSecs),
      RATE_LIMIT_SHARE: String(p.rateLimitShare),
      BRAZE_MAX_OBJECTS_PER_REQUEST: String(p.brazeMaxObjectsPerRequest),
      CONTINUATION_QUEUE_URL: this.brazeSyncQueue.queueUrl,
      // The maxReceiveCount of the queue itself (a message failing on that receive is reported).
      BRIDGE_MAX_RECEIVE_COUNT: String(this.brazeSyncQueue.deadLetterQueue?.maxReceiveCount ?? 0),
      // Routes default max_decompressed_bytes to the function's /tmp size.
      BRIDGE_EPHEMERAL_STORAGE_MB: String(FUNCTION_SIZING.brazeSync.ephemeralStorageMiB),
      // mimalloc returns freed memory at once: lower peak RSS per invocation (see template.yaml).
      MIMALLOC_PURGE_DELAY: '0',
      RUST_LOG: p.logLevel,
    };
    if (p.brazeRestEndpoint !== '') {
      brazeSyncEnvironment.BRAZE_REST_ENDPOINT = p.brazeRestEndpoint;
    }
    if (p.brazeHourlyRequestLimit !== 0) {
      brazeSyncEnvironment.BRAZE_HOURLY_REQUEST_LIMIT = String(p.brazeHourlyRequestLimit);
    }
    this.brazeSyncFunction = rustFunction(this, 'BrazeSyncFunction', {
      description: 'Syncs changed Amperity export rows to Braze /users/track.',
      code: prebuiltCode(props.brazeSyncCodePath ?? path.join(DEFAULT_LAMBDA_ROOT, 'braze-sync')),
      sizing: FUNCTION_SIZING.brazeSync,
      role: brazeSyncRole,
      logGroup: brazeSyncLogGroup,
      deadLetterQueue: this.brazeSyncDeadLetterQueue,
      environment: brazeSyncEnvironment,
      skips: [SKIP_RESERVED_CONCURRENCY, SKIP_VPC, SKIP_ENV_KMS],
    });
    new lambda.EventSourceMapping(this, 'BrazeSyncQueueEventSource', {
      target: this.brazeSyncFunction,
      eventSourceArn: this.brazeSyncQueue.queueArn,
      batchSize: 1, // One export per invocation: a run can take the whole 15 minutes.
      reportBatchItemFailures: true,
      maxConcurrency: p.brazeSyncMaxConcurrency,
    });

    // ---------------------------------------------------------------------------------------
    // currents-normalize
    // ---------------------------------------------------------------------------------------
    const currentsLogGroup = logGroup(this, 'CurrentsNormalizeLogGroup', p.logRetentionDays);
    const currentsRole = functionRole(this, 'CurrentsNormalizeRole', 'currents-normalize', [
      new iam.PolicyStatement({
        sid: 'WriteOwnLogs',
        actions: ['logs:CreateLogStream', 'logs:PutLogEvents'],
        resources: [currentsLogGroup.logGroupArn],
      }),
      new iam.PolicyStatement({
        sid: 'ConsumeOwnQueue',
        actions: [
          'sqs:ReceiveMessage',
          'sqs:DeleteMessage',
          'sqs:ChangeMessageVisibility',
          'sqs:GetQueueAttributes',
        ],
        resources: [this.currentsNormalizeQueue.queueArn],
      }),
      new iam.PolicyStatement({
        sid: 'SendFailedAsyncEventsToDeadLetterQueue',
        actions: ['sqs:SendMessage'],
        resources: [this.currentsNormalizeDeadLetterQueue.queueArn],
      }),
      new iam.PolicyStatement({
        sid: 'ReadCurrents',
        actions: ['s3:GetObject'],
        resources: [objectsArn(currents, p.currentsPrefix)],
      }),
      // Parquet parts (named from their source file, so a replay overwrites), quarantined copies
      // with their reasons, and run reports. Compaction (reading and deleting parts) runs as
      // CurrentsCompactFunction with its own role.
      new iam.PolicyStatement({
        sid: 'WriteTablesQuarantineAndReports',
        actions: ['s3:PutObject'],
        resources: [
          objectsArn(tables, p.tablesPrefix),
          objectsArn(tables, p.quarantinePrefix),
          objectsArn(tables, p.currentsReportsPrefix),
        ],
      }),
      // The profile-change feed braze-sync applies before each diff (deletes, orphans and other
      // sources' profile updates), one object per Currents file, in braze-sync's state bucket.
      new iam.PolicyStatement({
        sid: 'WriteProfileFeed',
        actions: ['s3:PutObject'],
        resources: [objectsArn(state, `${p.statePrefix}_currents/feed/`)],
      }),
    ]);
    this.currentsNormalizeFunction = rustFunction(this, 'CurrentsNormalizeFunction', {
      description: 'Normalizes Braze Currents Avro files into deduplicated Parquet tables.',
      code: prebuiltCode(
        props.currentsNormalizeCodePath ?? path.join(DEFAULT_LAMBDA_ROOT, 'currents-normalize'),
      ),
      sizing: FUNCTION_SIZING.currentsNormalize,
      role: currentsRole,
      logGroup: currentsLogGroup,
      deadLetterQueue: this.currentsNormalizeDeadLetterQueue,
      environment: {
        CURRENTS_PREFIX: p.currentsPrefix,
        TABLES_BUCKET: tables,
        TABLES_PREFIX: p.tablesPrefix,
        QUARANTINE_PREFIX: p.quarantinePrefix,
        REPORTS_PREFIX: p.currentsReportsPrefix,
        STATE_PREFIX: p.currentsStatePrefix,
        PROFILE_FEED_BUCKET: state,
        PROFILE_FEED_PREFIX: `${p.statePrefix}_currents/feed/`,
        // mimalloc keeps freed memory for the next object (see template.yaml).
        MIMALLOC_PURGE_DELAY: '-1',
        RUST_LOG: p.logLevel,
      },
      skips: [SKIP_RESERVED_CONCURRENCY, SKIP_VPC, SKIP_ENV_KMS],
    });
    new lambda.EventSourceMapping(this, 'CurrentsNormalizeQueueEventSource', {
      target: this.currentsNormalizeFunction,
      eventSourceArn: this.currentsNormalizeQueue.queueArn,
      batchSize: 10,
      reportBatchItemFailures: true,
      maxConcurrency: p.currentsNormalizeMaxConcurrency,
    });

    // ---------------------------------------------------------------------------------------
    // Compaction: the same code, started daily by EventBridge Scheduler with {"compact":{}}.
    // Its own function (15 minutes, memory and /tmp for the parts) and the only role that may
    // delete parts.
    // ---------------------------------------------------------------------------------------
    const compactLogGroup = logGroup(this, 'CurrentsCompactLogGroup', p.logRetentionDays);
    const compactRole = new iam.Role(this, 'CurrentsCompactRole', {
      description: "currents-normalize compaction execution role (least privilege; see each statement's Sid).",
      assumedBy: new iam.ServicePrincipal('lambda.amazonaws.com'),
      inlinePolicies: {
        'currents-compact': new iam.PolicyDocument({
          statements: [
            new iam.PolicyStatement({
              sid: 'WriteOwnLogs',
              actions: ['logs:CreateLogStream', 'logs:PutLogEvents'],
              resources: [compactLogGroup.logGroupArn],
            }),
            new iam.PolicyStatement({
              sid: 'SendFailedAsyncEventsToDeadLetterQueue',
              actions: ['sqs:SendMessage'],
              resources: [this.currentsNormalizeDeadLetterQueue.queueArn],
            }),
            // Listing finds the table-days; it also makes a missing lease or manifest a 404
            // rather than a 403.
            new iam.PolicyStatement({
              sid: 'ListTablesBucket',
              actions: ['s3:ListBucket'],
              resources: [bucketArn(tables)],
            }),
            new iam.PolicyStatement({
              sid: 'ReadWriteAndReplaceTableParts',
              actions: ['s3:GetObject', 's3:PutObject', 's3:DeleteObject'],
              resources: [objectsArn(tables, p.tablesPrefix)],
            }),
            new iam.PolicyStatement({
              sid: 'LeasesAndManifests',
              actions: ['s3:GetObject', 's3:PutObject'],
              resources: [objectsArn(tables, p.currentsStatePrefix)],
            }),
            new iam.PolicyStatement({
              sid: 'WriteReports',
              actions: ['s3:PutObject'],
              resources: [objectsArn(tables, p.currentsReportsPrefix)],
            }),
          ],
        }),
      },
    });
    this.currentsCompactFunction = rustFunction(this, 'CurrentsCompactFunction', {
      description: 'Compacts each Currents table-day into one deduplicated Parquet part.',
      code: prebuiltCode(
        props.currentsNormalizeCodePath ?? path.join(DEFAULT_LAMBDA_ROOT, 'currents-normalize'),
      ),
      sizing: FUNCTION_SIZING.currentsCompact,
      role: compactRole,
      logGroup: compactLogGroup,
      deadLetterQueue: this.currentsNormalizeDeadLetterQueue,
      environment: {
        CURRENTS_PREFIX: p.currentsPrefix,
        TABLES_BUCKET: tables,
        TABLES_PREFIX: p.tablesPrefix,
        QUARANTINE_PREFIX: p.quarantinePrefix,
        REPORTS_PREFIX: p.currentsReportsPrefix,
        STATE_PREFIX: p.currentsStatePrefix,
        RUST_LOG: p.logLevel,
      },
      skips: [SKIP_COMPACT_CONCURRENCY, SKIP_VPC_S3_ONLY, SKIP_ENV_PLAIN],
    });
    const schedulerRole = new iam.Role(this, 'CurrentsCompactSchedulerRole', {
      description: 'Lets EventBridge Scheduler start the daily compaction, and nothing else.',
      assumedBy: new iam.ServicePrincipal('scheduler.amazonaws.com', {
        conditions: { StringEquals: { 'aws:SourceAccount': cdk.Aws.ACCOUNT_ID } },
      }),
      inlinePolicies: {
        'invoke-compaction': new iam.PolicyDocument({
          statements: [
            new iam.PolicyStatement({
              sid: 'InvokeCompaction',
              actions: ['lambda:InvokeFunction'],
              resources: [this.currentsCompactFunction.functionArn],
            }),
          ],
        }),
      },
    });
    new scheduler.CfnSchedule(this, 'CurrentsCompactSchedule', {
      description: 'Daily compaction of the Currents tables (currents-normalize, payload {"compact":{}}).',
      scheduleExpression: p.compactionSchedule,
      scheduleExpressionTimezone: 'UTC',
      flexibleTimeWindow: { mode: 'OFF' },
      state: 'ENABLED',
      target: {
        arn: this.currentsCompactFunction.functionArn,
        roleArn: schedulerRole.roleArn,
        input: '{"compact":{}}',
        retryPolicy: { maximumRetryAttempts: 2, maximumEventAgeInSeconds: 3600 },
      },
    });

    // ---------------------------------------------------------------------------------------
    // Catalog: a Glue database and one table per registry table, partition projection on day.
    // ---------------------------------------------------------------------------------------
    const database = new glue.CfnDatabase(this, 'CurrentsGlueDatabase', {
      catalogId: cdk.Aws.ACCOUNT_ID,
      databaseInput: {
        name: p.glueDatabaseName,
        description: 'Braze Currents tables written by currents-normalize (Parquet, partition projection on day).',
      },
    });
    this.glueDatabaseName = database.ref;
    for (const t of CATALOG.tables) {
      new glue.CfnTable(this, t.logicalId, {
        catalogId: cdk.Aws.ACCOUNT_ID,
        databaseName: database.ref,
        tableInput: {
          name: t.name,
          description: t.description,
          tableType: 'EXTERNAL_TABLE',
          parameters: {
            classification: 'parquet',
            'parquet.compression': 'SNAPPY',
            'projection.enabled': 'true',
            'projection.day.type': 'date',
            'projection.day.format': 'yyyy-MM-dd',
            'projection.day.range': CATALOG.projectionRange,
            'projection.day.interval': '1',
            'projection.day.interval.unit': 'DAYS',
            'storage.location.template': `s3://${tables}/${p.tablesPrefix}${t.name}/${t.name}_\${day}.parquet/`,
          },
          partitionKeys: [{ name: 'day', type: 'string' }],
          storageDescriptor: {
            location: `s3://${tables}/${p.tablesPrefix}${t.name}/`,
            inputFormat: 'org.apache.hadoop.hive.ql.io.parquet.MapredParquetInputFormat',
            outputFormat: 'org.apache.hadoop.hive.ql.io.parquet.MapredParquetOutputFormat',
            serdeInfo: { serializationLibrary: 'org.apache.hadoop.hive.ql.io.parquet.serde.ParquetHiveSerDe' },
            columns: t.columns.map((c) => ({ name: c.name, type: c.type })),
          },
        },
      });
    }

    // ---------------------------------------------------------------------------------------
    // Alarms: function errors, throttles, and anything in a dead-letter queue.
    // ---------------------------------------------------------------------------------------
    let topic: sns.ITopic;
    if (p.alarmTopicArn !== '') {
      topic = sns.Topic.fromTopicArn(this, 'ImportedAlarmTopic', p.alarmTopicArn);
    } else {
      const created = new sns.Topic(this, 'AlarmTopic', { displayName: 'Amperity-Braze bridge alarms' });
      skipCheckov(created, SKIP_TOPIC_KMS);
      topic = created;
    }
    this.alarmTopicArn = topic.topicArn;
    const action = new cloudwatchActions.SnsAction(topic);
    const alarm = (alarmId: string, description: string, metric: cloudwatch.IMetric): void => {
      const a = new cloudwatch.Alarm(this, alarmId, {
        alarmDescription: description,
        metric,
        evaluationPeriods: 1,
        threshold: 0,
        comparisonOperator: cloudwatch.ComparisonOperator.GREATER_THAN_THRESHOLD,
        treatMissingData: cloudwatch.TreatMissingData.NOT_BREACHING,
      });
      a.addAlarmAction(action);
      a.addOkAction(action);
    };
    const period = cdk.Duration.minutes(5);
    for (const [prefix, name, fn, dlq] of [
      ['BrazeSync', 'braze-sync', this.brazeSyncFunction, this.brazeSyncDeadLetterQueue],
      ['CurrentsNormalize', 'currents-normalize', this.currentsNormalizeFunction, this.currentsNormalizeDeadLetterQueue],
    ] as const) {
      alarm(
        `${prefix}ErrorsAlarm`,
        `${name} invocations failed (see its logs).`,
        fn.metricErrors({ period, statistic: cloudwatch.Stats.SUM }),
      );
      alarm(
        `${prefix}ThrottlesAlarm`,
        `${name} invocations were throttled (account concurrency exhausted).`,
        fn.metricThrottles({ period, statistic: cloudwatch.Stats.SUM }),
      );
      if (prefix === 'BrazeSync') {
        alarm(
          'BrazeSyncApiKeyRefusedAlarm',
          'API key refused: Braze answered 401/403 to braze-sync even after it read the key again from its secret. ' +
            'Exports wait (retryable, not lost); fix the secret, then redrive the dead-letter queue or re-copy the exports.',
          new cloudwatch.Metric({
            namespace: 'AmperityBrazeBridge/BrazeSync',
            metricName: 'api_key_refused',
            period,
            statistic: cloudwatch.Stats.SUM,
          }),
        );
      }
      alarm(
        `${prefix}DeadLetterAlarm`,
        `Objects ${name} gave up on are waiting in its dead-letter queue; fix the cause, then redrive them.`,
        dlq.metricApproximateNumberOfMessagesVisible({ period, statistic: cloudwatch.Stats.MAXIMUM }),
      );
    }
    alarm(
      'CurrentsCompactErrorsAlarm',
      'currents-normalize compaction failed (see its logs and report); the next run retries.',
      this.currentsCompactFunction.metricErrors({ period, statistic: cloudwatch.Stats.SUM }),
    );
    // braze-sync's own metrics (EMF, no dimension): audience departures held by the guard.
    alarm(
      'BrazeSyncDeparturesHeldAlarm',
      'braze-sync held audience departures (more than max_departure_share of an audience would leave, or rows ' +
        'had no readable identifier). Read the run report (departures), then release them ' +
        '(bridge-allow-departures=true) or fix the export. See the runbook.',
      new cloudwatch.Metric({
        namespace: 'AmperityBrazeBridge/BrazeSync',
        metricName: 'departures_held',
        period,
        statistic: cloudwatch.Stats.SUM,
      }),
    );
    // A notification naming an export object that is not there (EMF metric without dimensions).
    alarm(
      'BrazeSyncObjectNotFoundAlarm',
      'object_not_found: a notification named an export object that is not there (deleted or renamed after upload, ' +
        'or its key decoded unexpectedly). Never retried; read the report (key_received, key_decoded), then ' +
        're-upload or re-copy the export. See the runbook.',
      new cloudwatch.Metric({
        namespace: 'AmperityBrazeBridge/BrazeSync',
        metricName: 'object_not_found',
        period,
        statistic: cloudwatch.Stats.SUM,
      }),
    );

    // A drift audit that found more than driftAlarmShare of its sample drifted or missing.
    const driftAlarm = new cloudwatch.Alarm(this, 'BrazeSyncDriftAlarm', {
      alarmDescription:
        'A drift audit found more than DriftAlarmShare of its sampled users with Braze values the state does not ' +
        'expect, or missing in Braze (drift_share). Read the audit report, then heal (braze-sync audit ROUTE --heal) ' +
        'or find the other writer. See the runbook.',
      metric: new cloudwatch.Metric({
        namespace: 'AmperityBrazeBridge/BrazeSync',
        metricName: 'drift_share',
        period,
        statistic: cloudwatch.Stats.MAXIMUM,
      }),
      evaluationPeriods: 1,
      threshold: p.driftAlarmShare,
      comparisonOperator: cloudwatch.ComparisonOperator.GREATER_THAN_THRESHOLD,
      treatMissingData: cloudwatch.TreatMissingData.NOT_BREACHING,
    });
    driftAlarm.addAlarmAction(action);
    driftAlarm.addOkAction(action);
    if (p.auditRoutes !== '') {
      this.scheduleAudits(p);
    }

    // ---------------------------------------------------------------------------------------
    // Operations dashboard: infra/dashboard.json, the same body template.yaml embeds.
    // ---------------------------------------------------------------------------------------
    this.dashboard = new cloudwatch.CfnDashboard(this, 'OperationsDashboard', {
      dashboardBody: cdk.Fn.sub(fs.readFileSync(DASHBOARD_JSON, 'utf8'), {
        BrazeSyncFunctionName: this.brazeSyncFunction.functionName,
        CurrentsNormalizeFunctionName: this.currentsNormalizeFunction.functionName,
        CurrentsCompactFunctionName: this.currentsCompactFunction.functionName,
        BrazeSyncQueueName: this.brazeSyncQueue.queueName,
        CurrentsNormalizeQueueName: this.currentsNormalizeQueue.queueName,
        BrazeSyncDeadLetterQueueName: this.brazeSyncDeadLetterQueue.queueName,
        CurrentsNormalizeDeadLetterQueueName: this.currentsNormalizeDeadLetterQueue.queueName,
      }),
    });
    this.dashboardUrl = cdk.Fn.sub(
      'https://${AWS::Region}.console.aws.amazon.com/cloudwatch/home?region=${AWS::Region}#dashboards:name=${Name}',
      { Name: this.dashboard.ref },
    );
  }

  /** The drift audit's weekly schedule: braze-sync started with `{"audit": {...}}`. */
  private scheduleAudits(p: { auditRoutes: string; auditSchedule: string; auditSample: number }): void {
    const role = new iam.Role(this, 'BrazeSyncAuditSchedulerRole', {
      description: "Lets EventBridge Scheduler start braze-sync's drift audit, and nothing else.",
      assumedBy: new iam.ServicePrincipal('scheduler.amazonaws.com', {
        conditions: { StringEquals: { 'aws:SourceAccount': cdk.Aws.ACCOUNT_ID } },
      }),
      inlinePolicies: {
        'invoke-audit': new iam.PolicyDocument({
          statements: [
            new iam.PolicyStatement({
              sid: 'InvokeAudit',
              actions: ['lambda:InvokeFunction'],
              resources: [this.brazeSyncFunction.functionArn],
            }),
          ],
        }),
      },
    });
    new scheduler.CfnSchedule(this, 'BrazeSyncAuditSchedule', {
      description: 'Drift audit of the routes in AuditRoutes (braze-sync, payload {"audit":{...}}).',
      scheduleExpression: p.auditSchedule,
      scheduleExpressionTimezone: 'UTC',
      flexibleTimeWindow: { mode: 'OFF' },
      state: 'ENABLED',
      target: {
        arn: this.brazeSyncFunction.functionArn,
        roleArn: role.roleArn,
        input: `{"audit":{"routes":"${p.auditRoutes}","sample":${p.auditSample}}}`,
        retryPolicy: { maximumRetryAttempts: 2, maximumEventAgeInSeconds: 3600 },
      },
    });
  }
}

/**
 * The dashboard body: CloudWatch dashboard JSON with `${...}` placeholders for `Fn::Sub`. Its
 * metric names are checked against the functions' EMF emitters by `tests/dashboard_metrics.rs`
 * in both function crates.
 */
export const DASHBOARD_JSON = path.resolve(__dirname, '..', 'dashboard.json');

/** Drops props that are explicitly `undefined`, so they do not override defaults. */
function definedOnly<T extends object>(props: T): Partial<T> {
  return Object.fromEntries(Object.entries(props).filter(([, v]) => v !== undefined)) as Partial<T>;
}

function deadLetterQueue(scope: Construct, id: string): sqs.Queue {
  const queue = new sqs.Queue(scope, id, {
    encryption: sqs.QueueEncryption.SQS_MANAGED,
    retentionPeriod: cdk.Duration.days(14), // the SQS maximum: time to fix and redrive
    removalPolicy: cdk.RemovalPolicy.DESTROY, // messages are event notifications: S3 keeps the objects
  });
  skipCheckov(queue, SKIP_DLQ_KMS);
  return queue;
}

function inputQueue(scope: Construct, id: string, dlq: sqs.Queue, functionTimeoutSeconds: number): sqs.Queue {
  const queue = new sqs.Queue(scope, id, {
    encryption: sqs.QueueEncryption.SQS_MANAGED,
    // At least 6x the function timeout, as AWS advises for SQS event sources.
    visibilityTimeout: cdk.Duration.seconds(6 * functionTimeoutSeconds),
    retentionPeriod: cdk.Duration.days(14),
    deadLetterQueue: { queue: dlq, maxReceiveCount: 5 },
    removalPolicy: cdk.RemovalPolicy.DESTROY,
  });
  skipCheckov(queue, SKIP_QUEUE_KMS);
  return queue;
}

/** The input queue's policy, TLS-only; the trigger adds who may send. */
function queuePolicy(scope: Construct, id: string, queue: sqs.Queue): sqs.QueuePolicy {
  const policy = new sqs.QueuePolicy(scope, id, { queues: [queue] });
  policy.document.addStatements(
    new iam.PolicyStatement({
      sid: 'DenyInsecureTransport',
      effect: iam.Effect.DENY,
      principals: [new iam.AnyPrincipal()],
      actions: ['sqs:*'],
      resources: [queue.queueArn],
      conditions: { Bool: { 'aws:SecureTransport': 'false' } },
    }),
  );
  return policy;
}

/** A bucket as the template makes them: SSE-S3, no public access, no ACLs, TLS only, versioned. */
function securedBucket(scope: Construct, id: string, bucketName?: string): s3.Bucket {
  const bucket = new s3.Bucket(scope, id, {
    bucketName,
    encryption: s3.BucketEncryption.S3_MANAGED,
    blockPublicAccess: s3.BlockPublicAccess.BLOCK_ALL,
    objectOwnership: s3.ObjectOwnership.BUCKET_OWNER_ENFORCED,
    enforceSSL: true,
    versioned: true,
    lifecycleRules: [
      {
        id: 'expire-old-versions',
        noncurrentVersionExpiration: cdk.Duration.days(30),
        abortIncompleteMultipartUploadAfter: cdk.Duration.days(7),
      },
    ],
    removalPolicy: cdk.RemovalPolicy.RETAIN,
  });
  skipCheckov(bucket, SKIP_ACCESS_LOGS);
  return bucket;
}

interface InputBucketTrigger {
  readonly bucketId: string;
  readonly ruleId: string;
  readonly nameStem: string;
  readonly givenName: string;
  readonly prefix: string;
  readonly queue: sqs.Queue;
  readonly queuePolicy: sqs.QueuePolicy;
  readonly notificationsSid: string;
  readonly ruleSid: string;
  readonly ruleDescription: string;
  readonly targetId: string;
}

/**
 * Wires an input bucket to its queue and returns the bucket's name. New bucket: S3 notification
 * to the queue (the bucket is named from the stack id so the queue policy can name it, and waits
 * for that policy). Existing bucket: an EventBridge rule on its "Object Created" events.
 */
function inputBucketTrigger(scope: Construct, t: InputBucketTrigger): string {
  if (t.givenName === '') {
    const name = cdk.Fn.join('-', [t.nameStem, stackUuid()]);
    const bucket = securedBucket(scope, t.bucketId, name);
    t.queuePolicy.document.addStatements(
      new iam.PolicyStatement({
        sid: t.notificationsSid,
        principals: [new iam.ServicePrincipal('s3.amazonaws.com')],
        actions: ['sqs:SendMessage'],
        resources: [t.queue.queueArn],
        conditions: {
          ArnEquals: { 'aws:SourceArn': bucketArn(name) },
          StringEquals: { 'aws:SourceAccount': cdk.Aws.ACCOUNT_ID },
        },
      }),
    );
    const cfnBucket = bucket.node.defaultChild as s3.CfnBucket;
    cfnBucket.notificationConfiguration = {
      queueConfigurations: [
        {
          event: 's3:ObjectCreated:*',
          queue: t.queue.queueArn,
          filter: { s3Key: { rules: [{ name: 'prefix', value: t.prefix }] } },
        },
      ],
    };
    cfnBucket.addResourceDependency(t.queuePolicy.node.defaultChild as cdk.CfnResource);
    return bucket.bucketName;
  }
  const rule = new events.CfnRule(scope, t.ruleId, {
    description: t.ruleDescription,
    eventPattern: {
      source: ['aws.s3'],
      'detail-type': ['Object Created'],
      detail: {
        bucket: { name: [t.givenName] },
        object: { key: [{ prefix: t.prefix }] },
      },
    },
    targets: [{ id: t.targetId, arn: t.queue.queueArn }],
  });
  t.queuePolicy.document.addStatements(
    new iam.PolicyStatement({
      sid: t.ruleSid,
      principals: [new iam.ServicePrincipal('events.amazonaws.com')],
      actions: ['sqs:SendMessage'],
      resources: [t.queue.queueArn],
      conditions: { ArnEquals: { 'aws:SourceArn': rule.attrArn } },
    }),
  );
  return t.givenName;
}

function logGroup(scope: Construct, id: string, retentionDays: number): logs.LogGroup {
  const group = new logs.LogGroup(scope, id, {
    retention: retentionDays as logs.RetentionDays,
    removalPolicy: cdk.RemovalPolicy.RETAIN, // logs outlive the stack until their retention ends
  });
  skipCheckov(group, SKIP_LOG_KMS);
  return group;
}

function functionRole(scope: Construct, id: string, policyName: string, statements: iam.PolicyStatement[]): iam.Role {
  return new iam.Role(scope, id, {
    description: `${policyName} execution role (least privilege; see each statement's Sid).`,
    assumedBy: new iam.ServicePrincipal('lambda.amazonaws.com'),
    inlinePolicies: { [policyName]: new iam.PolicyDocument({ statements }) },
  });
}

interface RustFunction {
  readonly description: string;
  readonly code: lambda.Code;
  readonly sizing: {
    readonly memorySize: number;
    readonly timeoutSeconds: number;
    readonly ephemeralStorageMiB?: number;
  };
  readonly role: iam.Role;
  readonly logGroup: logs.LogGroup;
  readonly deadLetterQueue: sqs.Queue;
  readonly environment: Record<string, string>;
  readonly skips: CheckovSkip[];
}

function rustFunction(scope: Construct, id: string, f: RustFunction): lambda.Function {
  const fn = new lambda.Function(scope, id, {
    description: f.description,
    code: f.code,
    handler: 'bootstrap',
    runtime: lambda.Runtime.PROVIDED_AL2023,
    architecture: lambda.Architecture.ARM_64,
    memorySize: f.sizing.memorySize,
    timeout: cdk.Duration.seconds(f.sizing.timeoutSeconds),
    ephemeralStorageSize:
      f.sizing.ephemeralStorageMiB === undefined ? undefined : cdk.Size.mebibytes(f.sizing.ephemeralStorageMiB),
    role: f.role,
    environment: f.environment,
    logGroup: f.logGroup,
    loggingFormat: lambda.LoggingFormat.JSON,
    // RUST_LOG is the one filter; Lambda passes what the function emits.
    applicationLogLevelV2: lambda.ApplicationLogLevel.TRACE,
  });
  // Set on the L1 resource: the L2 `deadLetterQueue` prop would add a second policy to the role.
  // Direct (asynchronous) invocations that fail land in the same DLQ as failed SQS messages.
  const cfnFunction = fn.node.defaultChild as lambda.CfnFunction;
  cfnFunction.deadLetterConfig = { targetArn: f.deadLetterQueue.queueArn };
  // The L2 adds DependsOn on the role; the Role GetAtt already orders them (cfn-lint W3005), and
  // the role carries its whole policy inline.
  cfnFunction.addOverride('DependsOn', undefined);
  skipCheckov(fn, ...f.skips);
  return fn;
}
