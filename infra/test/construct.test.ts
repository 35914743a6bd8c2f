/**
 * The CDK construct's resources, permissions and wiring, checked with the CDK assertions library
 * on templates synthesized from placeholder code (no Rust build, no AWS account, no network).
 */
import assert from 'node:assert/strict';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { describe, test } from 'node:test';

import * as cdk from 'aws-cdk-lib';
import { Match, Template } from 'aws-cdk-lib/assertions';

import { BrazeBridge, prebuiltCode } from '../lib/braze-bridge';
import { SECRET_ARN, logicalId, placeholderCode, synth } from './helpers';

type Statement = { Effect: string; Action: string | string[]; Resource: unknown; Condition?: unknown };

const EXISTING = {
  exportsBucketName: 'acme-amperity-exports',
  stateBucketName: 'acme-bridge-state',
  currentsBucketName: 'acme-braze-currents',
  tablesBucketName: 'acme-amperity-ingest',
};

/** The Allow statements of the role of the function labelled `fn`. */
function roleStatements(template: Template, fn: string): Statement[] {
  const resources = template.toJSON().Resources as Record<string, { Properties: Record<string, unknown> }>;
  const roleRef = resources[logicalId(template, fn)].Properties.Role as { 'Fn::GetAtt': [string, string] };
  const role = resources[roleRef['Fn::GetAtt'][0]].Properties;
  const policies = role.Policies as { PolicyDocument: { Statement: Statement[] } }[];
  return policies.flatMap((p) => p.PolicyDocument.Statement).filter((s) => s.Effect === 'Allow');
}

const actionsOf = (s: Statement): string[] => (Array.isArray(s.Action) ? s.Action : [s.Action]);

/** Resources rendered as text, with intrinsic functions flattened, for prefix checks. */
function resourceText(s: Statement): string[] {
  const list = Array.isArray(s.Resource) ? s.Resource : [s.Resource];
  const flatten = (v: unknown): string => {
    if (typeof v === 'string') return v;
    const o = v as Record<string, unknown>;
    if ('Fn::Join' in o) {
      const [sep, parts] = o['Fn::Join'] as [string, unknown[]];
      return parts.map(flatten).join(sep);
    }
    if ('Ref' in o) return `{${String(o.Ref)}}`;
    if ('Fn::GetAtt' in o) return `{${(o['Fn::GetAtt'] as string[]).join('.')}}`;
    return JSON.stringify(o);
  };
  return list.map(flatten);
}

describe('functions', () => {
  const template = synth();

  test('all run the arm64 bootstrap binary on provided.al2023 with the sized memory and timeout', () => {
    template.resourceCountIs('AWS::Lambda::Function', 3);
    for (const [fn, memory, timeout] of [
      ['BrazeSyncFunction', 1024, 900],
      ['CurrentsNormalizeFunction', 1024, 300],
      ['CurrentsCompactFunction', 2048, 900],
    ] as const) {
      template.hasResource('AWS::Lambda::Function', {
        Properties: Match.objectLike({
          Runtime: 'provided.al2023',
          Architectures: ['arm64'],
          Handler: 'bootstrap',
          MemorySize: memory,
          Timeout: timeout,
          LoggingConfig: { LogFormat: 'JSON', ApplicationLogLevel: 'TRACE', LogGroup: Match.anyValue() },
        }),
      });
      assert.ok(logicalId(template, fn));
    }
  });

  test('each logs as JSON to its own log group, kept for the retention given', () => {
    const t = synth({ logRetentionDays: 90 });
    t.resourcePropertiesCountIs('AWS::Logs::LogGroup', { RetentionInDays: 90 }, 3);
    for (const fn of ['BrazeSync', 'CurrentsNormalize', 'CurrentsCompact']) {
      t.hasResourceProperties('AWS::Lambda::Function', {
        LoggingConfig: Match.objectLike({ LogGroup: { Ref: logicalId(t, `${fn}LogGroup`) } }),
      });
    }
  });

  test('braze-sync gets its configuration and its own queue for continuations', () => {
    template.hasResourceProperties('AWS::Lambda::Function', {
      Environment: {
        Variables: Match.objectEquals({
          ROUTES_LOCATION: Match.anyValue(),
          STATE_BUCKET: { Ref: logicalId(template, 'StateBucket') },
          STATE_PREFIX: 'bridge/state/',
          REPORTS_PREFIX: 'bridge/reports/',
          REJECTS_PREFIX: 'bridge/rejects/',
          BRAZE_INSTANCE: 'US-03',
          BRAZE_API_KEY_SECRET_ARN: SECRET_ARN,
          BRAZE_RATE_LIMIT_REQUESTS: '3000',
          BRAZE_RATE_LIMIT_WINDOW_SECS: '3',
          RATE_LIMIT_SHARE: '1',
          BRAZE_MAX_OBJECTS_PER_REQUEST: '75',
          CONTINUATION_QUEUE_URL: { Ref: logicalId(template, 'BrazeSyncQueue') },
          BRIDGE_MAX_RECEIVE_COUNT: '5',
          BRIDGE_EPHEMERAL_STORAGE_MB: '4096',
          MIMALLOC_PURGE_DELAY: '0',
          RUST_LOG: 'info',
        }),
      },
    });
  });

  test('BRAZE_REST_ENDPOINT is set only when an endpoint is given', () => {
    const t = synth({ brazeRestEndpoint: 'https://rest.fra-02.braze.eu' });
    t.hasResourceProperties('AWS::Lambda::Function', {
      Environment: { Variables: Match.objectLike({ BRAZE_REST_ENDPOINT: 'https://rest.fra-02.braze.eu' }) },
    });
    template.resourcePropertiesCountIs(
      'AWS::Lambda::Function',
      { Environment: { Variables: Match.objectLike({ BRAZE_REST_ENDPOINT: Match.anyValue() }) } },
      0,
    );
  });

  test('currents-normalize gets its tables, quarantine and reports locations', () => {
    template.hasResourceProperties('AWS::Lambda::Function', {
      Environment: {
        Variables: Match.objectEquals({
          CURRENTS_PREFIX: 'currents/',
          TABLES_BUCKET: { Ref: logicalId(template, 'TablesBucket') },
          TABLES_PREFIX: 'tables/',
          QUARANTINE_PREFIX: 'quarantine/',
          REPORTS_PREFIX: 'reports/currents/',
          STATE_PREFIX: 'state/currents/',
          RUST_LOG: 'info',
        }),
      },
    });
  });

  test('compaction runs daily at 01:30 UTC from EventBridge Scheduler with {"compact":{}}', () => {
    template.resourceCountIs('AWS::Scheduler::Schedule', 1);
    template.hasResourceProperties('AWS::Scheduler::Schedule', {
      ScheduleExpression: 'cron(30 1 * * ? *)',
      ScheduleExpressionTimezone: 'UTC',
      Target: Match.objectLike({
        Arn: { 'Fn::GetAtt': [logicalId(template, 'CurrentsCompactFunction'), 'Arn'] },
        Input: '{"compact":{}}',
      }),
    });
    template.hasResourceProperties('AWS::Lambda::Function', {
      EphemeralStorage: { Size: 4096 },
      Role: { 'Fn::GetAtt': [logicalId(template, 'CurrentsCompactRole'), 'Arn'] },
    });
  });

  test('the drift audit has no schedule unless routes are named, then a weekly one per deployment', () => {
    template.resourcePropertiesCountIs('AWS::Scheduler::Schedule', { Target: Match.objectLike({ Arn: { 'Fn::GetAtt': [logicalId(template, 'BrazeSyncFunction'), 'Arn'] } }) }, 0);
    const audited = synth({ auditRoutes: 'customers,loyalty', auditSample: 500 });
    audited.resourceCountIs('AWS::Scheduler::Schedule', 2);
    audited.hasResourceProperties('AWS::Scheduler::Schedule', {
      ScheduleExpression: 'cron(0 4 ? * MON *)',
      ScheduleExpressionTimezone: 'UTC',
      Target: Match.objectLike({
        Arn: { 'Fn::GetAtt': [logicalId(audited, 'BrazeSyncFunction'), 'Arn'] },
        Input: '{"audit":{"routes":"customers,loyalty","sample":500}}',
      }),
    });
    assert.throws(() => synth({ auditRoutes: 'Customers; rm' }), /auditRoutes/);
    assert.throws(() => synth({ auditSample: 0 }), /auditSample/);
  });

  test('one Glue table per registry table, projected on day, under the tables prefix', () => {
    const catalog = JSON.parse(
      fs.readFileSync(path.join(__dirname, '../lib/glue-tables.generated.json'), 'utf8'),
    ) as { tables: { name: string }[] };
    template.resourceCountIs('AWS::Glue::Database', 1);
    template.resourceCountIs('AWS::Glue::Table', catalog.tables.length);
    template.hasResourceProperties('AWS::Glue::Table', {
      TableInput: Match.objectLike({
        Name: 'users_messages_email_send',
        PartitionKeys: [{ Name: 'day', Type: 'string' }],
        Parameters: Match.objectLike({ 'projection.enabled': 'true', 'projection.day.format': 'yyyy-MM-dd' }),
      }),
    });
  });
});

describe('queues and triggers', () => {
  const template = synth();

  test('each function consumes its own queue with ReportBatchItemFailures and a concurrency cap', () => {
    template.resourceCountIs('AWS::Lambda::EventSourceMapping', 2);
    for (const [fn, batch, concurrency] of [
      ['BrazeSync', 1, 5],
      ['CurrentsNormalize', 10, 10],
    ] as const) {
      template.hasResourceProperties('AWS::Lambda::EventSourceMapping', {
        FunctionName: { Ref: logicalId(template, `${fn}Function`) },
        EventSourceArn: { 'Fn::GetAtt': [logicalId(template, `${fn}Queue`), 'Arn'] },
        BatchSize: batch,
        FunctionResponseTypes: ['ReportBatchItemFailures'],
        ScalingConfig: { MaximumConcurrency: concurrency },
      });
    }
  });

  test('input queues redrive to their DLQ after 5 receives and outlast 6 function timeouts', () => {
    for (const [fn, timeout] of [
      ['BrazeSync', 900],
      ['CurrentsNormalize', 300],
    ] as const) {
      template.hasResourceProperties('AWS::SQS::Queue', {
        VisibilityTimeout: 6 * timeout,
        SqsManagedSseEnabled: true,
        RedrivePolicy: {
          deadLetterTargetArn: { 'Fn::GetAtt': [logicalId(template, `${fn}DeadLetterQueue`), 'Arn'] },
          maxReceiveCount: 5,
        },
      });
      template.hasResourceProperties('AWS::Lambda::Function', {
        DeadLetterConfig: { TargetArn: { 'Fn::GetAtt': [logicalId(template, `${fn}DeadLetterQueue`), 'Arn'] } },
      });
    }
    template.resourceCountIs('AWS::SQS::Queue', 4);
  });

  test('new input buckets notify their queue for objects under the input prefix, after its policy exists', () => {
    for (const [bucket, queue, prefix] of [
      ['ExportsBucket', 'BrazeSyncQueue', 'amperity/'],
      ['CurrentsBucket', 'CurrentsNormalizeQueue', 'currents/'],
    ] as const) {
      const resources = template.toJSON().Resources as Record<string, { Properties: Record<string, unknown> }>;
      assert.ok(resources[logicalId(template, bucket)].Properties.NotificationConfiguration, bucket);
      template.hasResource('AWS::S3::Bucket', {
        Properties: Match.objectLike({
          NotificationConfiguration: {
            QueueConfigurations: [
              {
                Event: 's3:ObjectCreated:*',
                Queue: { 'Fn::GetAtt': [logicalId(template, queue), 'Arn'] },
                Filter: { S3Key: { Rules: [{ Name: 'prefix', Value: prefix }] } },
              },
            ],
          },
        }),
        DependsOn: [logicalId(template, `${queue}Policy`)],
      });
      template.hasResourceProperties('AWS::SQS::QueuePolicy', {
        Queues: [{ Ref: logicalId(template, queue) }],
        PolicyDocument: {
          Statement: Match.arrayWith([
            Match.objectLike({
              Effect: 'Allow',
              Principal: { Service: 's3.amazonaws.com' },
              Action: 'sqs:SendMessage',
              Condition: {
                ArnEquals: { 'aws:SourceArn': Match.anyValue() },
                StringEquals: { 'aws:SourceAccount': { Ref: 'AWS::AccountId' } },
              },
            }),
          ]),
        },
      });
    }
    template.resourceCountIs('AWS::Events::Rule', 0);
  });

  test('existing input buckets trigger through EventBridge rules on their name and prefix', () => {
    const t = synth(EXISTING);
    t.resourceCountIs('AWS::S3::Bucket', 0);
    t.resourceCountIs('AWS::Events::Rule', 2);
    for (const [bucket, queue, prefix] of [
      ['acme-amperity-exports', 'BrazeSyncQueue', 'amperity/'],
      ['acme-braze-currents', 'CurrentsNormalizeQueue', 'currents/'],
    ] as const) {
      t.hasResourceProperties('AWS::Events::Rule', {
        EventPattern: {
          source: ['aws.s3'],
          'detail-type': ['Object Created'],
          detail: { bucket: { name: [bucket] }, object: { key: [{ prefix }] } },
        },
        Targets: [Match.objectLike({ Arn: { 'Fn::GetAtt': [logicalId(t, queue), 'Arn'] } })],
      });
      t.hasResourceProperties('AWS::SQS::QueuePolicy', {
        Queues: [{ Ref: logicalId(t, queue) }],
        PolicyDocument: {
          Statement: Match.arrayWith([
            Match.objectLike({
              Principal: { Service: 'events.amazonaws.com' },
              Action: 'sqs:SendMessage',
              Condition: { ArnEquals: { 'aws:SourceArn': Match.objectLike({ 'Fn::GetAtt': Match.anyValue() }) } },
            }),
          ]),
        },
      });
    }
    t.resourcePropertiesCountIs(
      'AWS::SQS::QueuePolicy',
      { PolicyDocument: { Statement: Match.arrayWith([Match.objectLike({ Principal: { Service: 's3.amazonaws.com' } })]) } },
      0,
    );
  });

  test('queues accept TLS only', () => {
    template.resourcePropertiesCountIs(
      'AWS::SQS::QueuePolicy',
      {
        PolicyDocument: {
          Statement: Match.arrayWith([
            Match.objectLike({ Effect: 'Deny', Action: 'sqs:*', Condition: { Bool: { 'aws:SecureTransport': 'false' } } }),
          ]),
        },
      },
      2,
    );
  });
});

describe('buckets', () => {
  test('created buckets are encrypted, private, versioned, TLS-only and retained', () => {
    const template = synth();
    template.resourceCountIs('AWS::S3::Bucket', 4);
    template.resourcePropertiesCountIs(
      'AWS::S3::Bucket',
      Match.objectLike({
        BucketEncryption: { ServerSideEncryptionConfiguration: [{ ServerSideEncryptionByDefault: { SSEAlgorithm: 'AES256' } }] },
        PublicAccessBlockConfiguration: {
          BlockPublicAcls: true,
          BlockPublicPolicy: true,
          IgnorePublicAcls: true,
          RestrictPublicBuckets: true,
        },
        OwnershipControls: { Rules: [{ ObjectOwnership: 'BucketOwnerEnforced' }] },
        VersioningConfiguration: { Status: 'Enabled' },
      }),
      4,
    );
    template.resourcePropertiesCountIs(
      'AWS::S3::BucketPolicy',
      {
        PolicyDocument: {
          Statement: Match.arrayWith([
            Match.objectLike({ Effect: 'Deny', Action: 's3:*', Condition: { Bool: { 'aws:SecureTransport': 'false' } } }),
          ]),
        },
      },
      4,
    );
    for (const resource of Object.values(template.findResources('AWS::S3::Bucket'))) {
      assert.equal(resource.DeletionPolicy, 'Retain');
    }
  });

  test('only the buckets not given by name are created', () => {
    const t = synth({ exportsBucketName: 'acme-amperity-exports', tablesBucketName: 'acme-amperity-ingest' });
    t.resourceCountIs('AWS::S3::Bucket', 2);
    assert.ok(logicalId(t, 'StateBucket'));
    assert.ok(logicalId(t, 'CurrentsBucket'));
    t.resourceCountIs('AWS::Events::Rule', 1);
  });
});

describe('least-privilege IAM', () => {
  for (const [name, props] of [
    ['new buckets', {}],
    ['existing buckets', EXISTING],
  ] as const) {
    const template = synth(props);

    test(`${name}: no role has managed policies, wildcard actions or wildcard resources`, () => {
      for (const role of Object.values(template.findResources('AWS::IAM::Role'))) {
        assert.equal(role.Properties.ManagedPolicyArns, undefined);
      }
      for (const fn of ['BrazeSyncFunction', 'CurrentsNormalizeFunction']) {
        for (const s of roleStatements(template, fn)) {
          assert.ok(actionsOf(s).every((a) => !a.includes('*')), `${fn}: ${actionsOf(s).join(',')}`);
          assert.ok(resourceText(s).every((r) => r !== '*'), `${fn}: resource *`);
        }
      }
      template.resourceCountIs('AWS::IAM::Policy', 0);
    });

    test(`${name}: only braze-sync reads a secret, and only the Braze API key`, () => {
      const brazeSync = roleStatements(template, 'BrazeSyncFunction').filter((s) =>
        actionsOf(s).some((a) => a.startsWith('secretsmanager:')),
      );
      assert.deepEqual(
        brazeSync.map((s) => [actionsOf(s), s.Resource]),
        [[['secretsmanager:GetSecretValue'], SECRET_ARN]],
      );
      assert.ok(
        roleStatements(template, 'CurrentsNormalizeFunction').every(
          (s) => !actionsOf(s).some((a) => a.startsWith('secretsmanager:') || a.startsWith('kms:')),
        ),
      );
    });

    test(`${name}: each function writes only under its own output prefixes`, () => {
      const writes = (fn: string): string[] =>
        roleStatements(template, fn)
          .filter((s) => actionsOf(s).some((a) => a === 's3:PutObject' || a === 's3:DeleteObject'))
          .flatMap(resourceText)
          .map((r) => r.replace(/^.*:s3:::[^/]+\//, ''))
          .sort();
      assert.deepEqual(writes('BrazeSyncFunction'), [
        'bridge/rejects/*',
        'bridge/reports/*',
        // Deletes only in its own state (replaced state objects, sender leases, fan-out
        // control objects).
        'bridge/state/*',
      ]);
      assert.deepEqual(writes('CurrentsNormalizeFunction'), ['bridge/state/_currents/feed/*', 'quarantine/*', 'reports/currents/*', 'tables/*']);
    });

    test(`${name}: each function reads only its input prefixes and its own outputs`, () => {
      const reads = (fn: string): string[] =>
        roleStatements(template, fn)
          .filter((s) => actionsOf(s).some((a) => a === 's3:GetObject'))
          .flatMap(resourceText)
          .map((r) => r.replace(/^.*:s3:::[^/]+\//, ''))
          .sort();
      assert.deepEqual(reads('BrazeSyncFunction'), ['amperity/*', 'bridge/routes/*', 'bridge/state/*']);
      assert.deepEqual(reads('CurrentsNormalizeFunction'), ['currents/*']);
    });

    test(`${name}: queue permissions cover only the function's own queues`, () => {
      for (const fn of ['BrazeSync', 'CurrentsNormalize']) {
        const own = [`${fn}Queue`, `${fn}DeadLetterQueue`].map((q) => `{${logicalId(template, q)}.Arn}`);
        for (const s of roleStatements(template, `${fn}Function`).filter((x) => actionsOf(x)[0].startsWith('sqs:'))) {
          assert.ok(resourceText(s).every((r) => own.includes(r)), `${fn}: ${resourceText(s).join(',')}`);
        }
      }
      const continuation = roleStatements(template, 'BrazeSyncFunction').filter(
        (s) => actionsOf(s).includes('sqs:SendMessage') && actionsOf(s).includes('sqs:ReceiveMessage'),
      );
      assert.deepEqual(resourceText(continuation[0]), [`{${logicalId(template, 'BrazeSyncQueue')}.Arn}`]);
    });
  }
});

describe('alarms', () => {
  test('errors, throttles and DLQ depth alarm per function, notifying a created topic', () => {
    const template = synth();
    template.resourceCountIs('AWS::CloudWatch::Alarm', 11);
    template.resourceCountIs('AWS::SNS::Topic', 1);
    const topic = { Ref: logicalId(template, 'AlarmTopic') };
    for (const fn of ['BrazeSync', 'CurrentsNormalize']) {
      for (const metric of ['Errors', 'Throttles']) {
        template.hasResourceProperties('AWS::CloudWatch::Alarm', {
          Namespace: 'AWS/Lambda',
          MetricName: metric,
          Dimensions: [{ Name: 'FunctionName', Value: { Ref: logicalId(template, `${fn}Function`) } }],
          Threshold: 0,
          ComparisonOperator: 'GreaterThanThreshold',
          AlarmActions: [topic],
          OKActions: [topic],
        });
      }
      template.hasResourceProperties('AWS::CloudWatch::Alarm', {
        Namespace: 'AWS/SQS',
        MetricName: 'ApproximateNumberOfMessagesVisible',
        Dimensions: [{ Name: 'QueueName', Value: { 'Fn::GetAtt': [logicalId(template, `${fn}DeadLetterQueue`), 'QueueName'] } }],
        AlarmActions: [topic],
      });
    }
    // Audience departures held by braze-sync's guard (EMF metric without dimensions).
    template.hasResourceProperties('AWS::CloudWatch::Alarm', {
      Namespace: 'AmperityBrazeBridge/BrazeSync',
      MetricName: 'departures_held',
      Statistic: 'Sum',
      Threshold: 0,
      ComparisonOperator: 'GreaterThanThreshold',
      AlarmActions: [topic],
      OKActions: [topic],
    });
    // "API key refused": braze-sync's own metric, across routes.
    template.hasResourceProperties('AWS::CloudWatch::Alarm', {
      Namespace: 'AmperityBrazeBridge/BrazeSync',
      MetricName: 'api_key_refused',
      Statistic: 'Sum',
      Threshold: 0,
      ComparisonOperator: 'GreaterThanThreshold',
      AlarmDescription: Match.stringLikeRegexp('^API key refused'),
      AlarmActions: [topic],
    });
    // A drift audit above the drift share (the audit's own metric, across routes).
    template.hasResourceProperties('AWS::CloudWatch::Alarm', {
      Namespace: 'AmperityBrazeBridge/BrazeSync',
      MetricName: 'drift_share',
      Statistic: 'Maximum',
      Threshold: 0.01,
      ComparisonOperator: 'GreaterThanThreshold',
      AlarmActions: [topic],
      OKActions: [topic],
    });
    // A notification naming a missing export object: braze-sync's own metric, across routes.
    template.hasResourceProperties('AWS::CloudWatch::Alarm', {
      Namespace: 'AmperityBrazeBridge/BrazeSync',
      MetricName: 'object_not_found',
      Statistic: 'Sum',
      Threshold: 0,
      ComparisonOperator: 'GreaterThanThreshold',
      AlarmDescription: Match.stringLikeRegexp('^object_not_found'),
      AlarmActions: [topic],
      OKActions: [topic],
    });
  });

  test('braze-sync has ephemeral storage for its spills', () => {
    synth().hasResourceProperties('AWS::Lambda::Function', {
      Description: Match.stringLikeRegexp('Braze /users/track'),
      EphemeralStorage: { Size: 4096 },
    });
  });

  test('a given topic is used instead of creating one', () => {
    const arn = 'arn:aws:sns:us-east-1:123456789012:ops';
    const template = synth({ alarmTopicArn: arn });
    template.resourceCountIs('AWS::SNS::Topic', 0);
    template.resourcePropertiesCountIs('AWS::CloudWatch::Alarm', { AlarmActions: [arn], OKActions: [arn] }, 11);
  });
});

describe('checks on the construct itself', () => {
  test('every checkov skip carries a reason', () => {
    const template = synth();
    let skips = 0;
    for (const resource of Object.values(template.toJSON().Resources as Record<string, { Metadata?: { checkov?: { skip: { id: string; comment: string }[] } } }>)) {
      for (const skip of resource.Metadata?.checkov?.skip ?? []) {
        assert.match(skip.id, /^CKV2?_AWS_\d+$/);
        assert.ok(skip.comment.length > 40, `${skip.id} needs a reason`);
        skips += 1;
      }
    }
    assert.ok(skips > 0);
  });

  test('synthesis needs no account, region or lookups', () => {
    const app = new cdk.App({ analyticsReporting: false });
    const stack = new cdk.Stack(app, 'Agnostic');
    new BrazeBridge(stack, 'Bridge', { brazeApiKeySecretArn: SECRET_ARN, ...placeholderCode() });
    const assembly = app.synth();
    assert.equal(assembly.manifest.missing, undefined);
    assert.equal(cdk.Token.isUnresolved(stack.account), true);
  });

  test('bad props are refused with the prop named', () => {
    assert.throws(() => synth({ exportsPrefix: 'amperity' }), /exportsPrefix/);
    assert.throws(() => synth({ tablesPrefix: '/tables/' }), /tablesPrefix/);
    assert.throws(() => synth({ rateLimitShare: 0 }), /rateLimitShare/);
    assert.throws(() => synth({ rateLimitShare: 1.5 }), /rateLimitShare/);
    assert.throws(() => synth({ brazeMaxObjectsPerRequest: 100 }), /brazeMaxObjectsPerRequest/);
    assert.throws(() => synth({ brazeHourlyRequestLimit: -1 }), /brazeHourlyRequestLimit/);
    assert.throws(() => synth({ brazeSyncMaxConcurrency: 1 }), /brazeSyncMaxConcurrency/);
  });
});

describe('prebuilt code', () => {
  const dir = (files: string[]): string => {
    const d = fs.mkdtempSync(path.join(os.tmpdir(), 'braze-bridge-code-'));
    for (const f of files) fs.writeFileSync(path.join(d, f), 'x');
    return d;
  };

  test('a cargo lambda zip is used as the asset itself', () => {
    const d = dir(['bootstrap.zip']);
    const code = prebuiltCode(d) as unknown as { path: string };
    assert.equal(code.path, path.join(d, 'bootstrap.zip'));
  });

  test('a directory holding bootstrap is zipped by CDK', () => {
    const d = dir(['bootstrap']);
    const code = prebuiltCode(d) as unknown as { path: string };
    assert.equal(code.path, d);
  });

  test('missing code asks for make build', () => {
    assert.throws(() => prebuiltCode(dir([])), /make build/);
  });
});
