/**
 * Reads `template.yaml` (SAM, CloudFormation short tags) and synthesized CDK templates into one
 * comparable model: the template is evaluated for given parameter values (conditions decided,
 * `Fn::If`/`Fn::Sub`/`Fn::Join`/`Ref` resolved), resource references become `{Label}` /
 * `{Label.Attr}` with CDK's logical-id prefix and hash removed, and each aspect the parity test
 * compares (functions, environment, triggers, queues, policies, alarms, ...) is extracted in the
 * same shape from SAM and plain CloudFormation resources.
 */
import * as fs from 'node:fs';

import { parse } from 'yaml';
import type { CollectionTag, ScalarTag } from 'yaml';

type Json = null | boolean | number | string | Json[] | { [key: string]: Json };
type JsonObject = { [key: string]: Json };

/** Marks `AWS::NoValue`: the key or list item is removed. */
const NO_VALUE = Symbol('AWS::NoValue');
type Evaluated = Json | typeof NO_VALUE;

const INTRINSICS = [
  'Base64',
  'Cidr',
  'Equals',
  'FindInMap',
  'GetAtt',
  'GetAZs',
  'If',
  'ImportValue',
  'Join',
  'Not',
  'And',
  'Or',
  'Select',
  'Split',
  'Sub',
  'ToJsonString',
  'Transform',
] as const;

/** YAML tags for CloudFormation's short forms (`!Ref`, `!Sub`, `!If`, ...), as their long forms. */
function cloudFormationTags(): (ScalarTag | CollectionTag)[] {
  const tags: (ScalarTag | CollectionTag)[] = [
    { tag: '!Ref', resolve: (value: string) => ({ Ref: value }) },
    { tag: '!Condition', resolve: (value: string) => ({ Condition: value }) },
  ];
  for (const name of INTRINSICS) {
    const key = `Fn::${name}`;
    tags.push({
      tag: `!${name}`,
      resolve: (value: string) => ({ [key]: name === 'GetAtt' ? splitGetAtt(value) : value }),
    });
    tags.push({ tag: `!${name}`, collection: 'seq', resolve: (seq) => ({ [key]: seq.toJSON() }) });
    tags.push({ tag: `!${name}`, collection: 'map', resolve: (map) => ({ [key]: map.toJSON() }) });
  }
  return tags;
}

function splitGetAtt(value: string): string[] {
  const dot = value.indexOf('.');
  return [value.slice(0, dot), value.slice(dot + 1)];
}

/** Parses a CloudFormation/SAM YAML template. */
export function loadYamlTemplate(file: string): JsonObject {
  return parse(fs.readFileSync(file, 'utf8'), { customTags: cloudFormationTags() }) as JsonObject;
}

/** One resource after evaluation, under its label. */
export interface EvaluatedResource {
  readonly type: string;
  readonly properties: JsonObject;
  readonly metadata: JsonObject;
  readonly deletionPolicy?: string;
  readonly updateReplacePolicy?: string;
}

/** A template evaluated for one set of parameter values. */
export interface EvaluatedTemplate {
  readonly resources: Record<string, EvaluatedResource>;
}

const PSEUDO: Record<string, string> = {
  'AWS::AccountId': '{AWS::AccountId}',
  'AWS::Partition': '{AWS::Partition}',
  'AWS::Region': '{AWS::Region}',
  'AWS::StackName': '{AWS::StackName}',
  'AWS::URLSuffix': '{AWS::URLSuffix}',
  // Shaped like the real stack id so `Fn::Select [2, Fn::Split ['/', ...]]` yields its UUID.
  'AWS::StackId': 'arn:{AWS::Partition}:cloudformation:{AWS::Region}:{AWS::AccountId}:stack/{AWS::StackName}/{StackUuid}',
};

/**
 * Evaluates `template` with `overrides` for its parameters (others take their Default).
 * `label` maps a logical id to the name the model uses (identity for template.yaml).
 */
export function evaluateTemplate(
  template: JsonObject,
  overrides: Record<string, string>,
  label: (logicalId: string) => string = (id) => id,
): EvaluatedTemplate {
  const parameters = (template.Parameters ?? {}) as Record<string, JsonObject>;
  const params: Record<string, string> = {};
  for (const [name, spec] of Object.entries(parameters)) {
    if (name in overrides) {
      params[name] = overrides[name];
    } else if (spec.Default !== undefined) {
      params[name] = String(spec.Default);
    }
  }
  for (const name of Object.keys(overrides)) {
    if (!(name in parameters)) {
      throw new Error(`no parameter ${name} in the template`);
    }
  }
  const resourcesIn = (template.Resources ?? {}) as Record<string, JsonObject>;
  const conditionsIn = (template.Conditions ?? {}) as Record<string, Json>;
  const conditions: Record<string, boolean> = {};

  const ref = (name: string): Evaluated => {
    if (name === 'AWS::NoValue') {
      return NO_VALUE;
    }
    if (name in PSEUDO) {
      return PSEUDO[name];
    }
    if (name in params) {
      return params[name];
    }
    if (name in resourcesIn) {
      return `{${label(name)}}`;
    }
    throw new Error(`Ref to unknown ${name}`);
  };

  const condition = (name: string): boolean => {
    if (!(name in conditions)) {
      if (!(name in conditionsIn)) {
        throw new Error(`unknown condition ${name}`);
      }
      conditions[name] = conditionValue(conditionsIn[name]);
    }
    return conditions[name];
  };

  const conditionValue = (expr: Json): boolean => {
    const [fn, args] = intrinsic(expr) ?? fail(`not a condition: ${JSON.stringify(expr)}`);
    const list = args as Json[];
    switch (fn) {
      case 'Fn::Equals':
        return String(evaluate(list[0])) === String(evaluate(list[1]));
      case 'Fn::Not':
        return !conditionValue(list[0]);
      case 'Fn::And':
        return list.every(conditionValue);
      case 'Fn::Or':
        return list.some(conditionValue);
      case 'Condition':
        return condition(args as string);
      default:
        return fail(`unsupported condition function ${fn}`);
    }
  };

  const sub = (text: string, vars: Record<string, Evaluated>): string =>
    text.replace(/\$\{([^}]+)\}/g, (_, name: string) => {
      if (name.startsWith('!')) {
        return `\${${name.slice(1)}}`;
      }
      if (name in vars) {
        return String(vars[name]);
      }
      if (name.includes('.') && !name.startsWith('AWS::')) {
        const [id, attr] = splitGetAtt(name);
        return `{${label(id)}.${attr}}`;
      }
      return String(ref(name));
    });

  const evaluate = (node: Json): Evaluated => {
    if (Array.isArray(node)) {
      return node.map(evaluate).filter((v): v is Json => v !== NO_VALUE);
    }
    if (node === null || typeof node !== 'object') {
      return node === null ? null : String(node);
    }
    const call = intrinsic(node);
    if (call === undefined) {
      const out: JsonObject = {};
      for (const [k, v] of Object.entries(node)) {
        const value = evaluate(v);
        if (value !== NO_VALUE) {
          out[k] = value;
        }
      }
      return out;
    }
    const [fn, args] = call;
    switch (fn) {
      case 'Ref':
        return ref(args as string);
      case 'Fn::GetAtt': {
        const [id, attr] = typeof args === 'string' ? splitGetAtt(args) : (args as string[]);
        return `{${label(id)}.${attr}}`;
      }
      case 'Fn::Sub': {
        if (typeof args === 'string') {
          return sub(args, {});
        }
        const [text, varsIn] = args as [string, JsonObject];
        const vars: Record<string, Evaluated> = {};
        for (const [k, v] of Object.entries(varsIn)) {
          vars[k] = evaluate(v);
        }
        return sub(text, vars);
      }
      case 'Fn::Join': {
        const [delimiter, list] = args as [string, Json];
        return (evaluate(list) as Json[]).map(String).join(delimiter);
      }
      case 'Fn::Split': {
        const [delimiter, text] = args as [string, Json];
        return String(evaluate(text)).split(delimiter);
      }
      case 'Fn::Select': {
        const [index, list] = args as [Json, Json];
        return (evaluate(list) as Json[])[Number(evaluate(index))];
      }
      case 'Fn::If': {
        const [name, whenTrue, whenFalse] = args as [string, Json, Json];
        return evaluate(condition(name) ? whenTrue : whenFalse);
      }
      default:
        return fail(`unsupported intrinsic ${fn}`);
    }
  };

  const resources: Record<string, EvaluatedResource> = {};
  for (const [id, resource] of Object.entries(resourcesIn)) {
    if (typeof resource.Condition === 'string' && !condition(resource.Condition)) {
      continue;
    }
    const type = resource.Type as string;
    if (type === 'AWS::CDK::Metadata') {
      continue;
    }
    resources[label(id)] = {
      type,
      properties: (evaluate(resource.Properties ?? {}) as JsonObject) ?? {},
      metadata: (resource.Metadata ?? {}) as JsonObject,
      deletionPolicy: resource.DeletionPolicy as string | undefined,
      updateReplacePolicy: resource.UpdateReplacePolicy as string | undefined,
    };
  }
  return { resources };
}

function intrinsic(node: Json): [string, Json] | undefined {
  if (node === null || typeof node !== 'object' || Array.isArray(node)) {
    return undefined;
  }
  const keys = Object.keys(node);
  if (keys.length === 1 && (keys[0] === 'Ref' || keys[0] === 'Condition' || keys[0].startsWith('Fn::'))) {
    return [keys[0], node[keys[0]]];
  }
  return undefined;
}

function fail(message: string): never {
  throw new Error(message);
}

/** Labels of a CDK construct's resources: its logical ids without the construct prefix and hash. */
export function cdkLabel(constructId: string): (logicalId: string) => string {
  return (logicalId) => {
    const m = new RegExp(`^${constructId}(.+)[0-9A-F]{8}$`).exec(logicalId);
    return m ? m[1] : logicalId;
  };
}

/** JSON with sorted keys, so equal objects print equal. */
export function canonical(value: unknown): string {
  return JSON.stringify(value, (_, v: unknown) =>
    v && typeof v === 'object' && !Array.isArray(v)
      ? Object.fromEntries(Object.entries(v as Record<string, unknown>).sort(([a], [b]) => (a < b ? -1 : 1)))
      : v,
  );
}

const asList = (v: Json | undefined): Json[] => (v === undefined ? [] : Array.isArray(v) ? v : [v]);

/** A policy statement without its Sid (a label, not a permission), lists sorted, `{AWS: '*'}` as '*'. */
function statement(s: JsonObject): string {
  let principal = s.Principal;
  if (principal && typeof principal === 'object' && !Array.isArray(principal)) {
    const p = principal as JsonObject;
    if (Object.keys(p).length === 1 && p.AWS === '*') {
      principal = '*';
    } else {
      principal = Object.fromEntries(Object.entries(p).map(([k, v]) => [k, asList(v).map(String).sort()]));
    }
  }
  return canonical({
    Effect: s.Effect,
    Principal: principal ?? null,
    Action: asList(s.Action).map(String).sort(),
    Resource: asList(s.Resource).map(String).sort(),
    Condition: s.Condition ?? null,
  });
}

function statements(document: Json | undefined): string[] {
  const doc = (document ?? {}) as JsonObject;
  return asList(doc.Statement)
    .map((s) => statement(s as JsonObject))
    .sort();
}

/** `{Label.Attr}` or `{Label}` -> Label. */
function refLabel(value: Json | undefined): string {
  const m = /^\{([^}.]+)(\.[^}]+)?\}$/.exec(String(value));
  return m ? m[1] : String(value);
}

/** What the parity test compares, aspect by aspect. */
export interface BridgeModel {
  /** `Type Label` of every resource (SAM functions as Lambda functions; event source mappings apart). */
  resources: string[];
  functions: Record<string, JsonObject>;
  environment: Record<string, Record<string, Json>>;
  eventSources: string[];
  triggers: string[];
  queues: Record<string, JsonObject>;
  resourcePolicies: Record<string, { targets: string[]; statements: string[] }>;
  buckets: Record<string, JsonObject>;
  logGroups: Record<string, JsonObject>;
  roles: Record<string, { assume: string[]; statements: string[] }>;
  /** Function label -> the IAM actions its role allows. */
  iamActions: Record<string, string[]>;
  alarms: Record<string, JsonObject>;
  /** Schedules, Glue databases and Glue tables, whole. */
  catalog: Record<string, string>;
  /** Dashboard label -> its body, parsed. */
  dashboards: Record<string, Json>;
  removal: Record<string, string>;
  checkovSkips: Record<string, string[]>;
}

/** Extracts the model from an evaluated SAM or CloudFormation template. */
export function bridgeModel(t: EvaluatedTemplate): BridgeModel {
  const model: BridgeModel = {
    resources: [],
    functions: {},
    environment: {},
    eventSources: [],
    triggers: [],
    queues: {},
    resourcePolicies: {},
    buckets: {},
    logGroups: {},
    roles: {},
    iamActions: {},
    alarms: {},
    catalog: {},
    dashboards: {},
    removal: {},
    checkovSkips: {},
  };
  const roleStatements: Record<string, string[]> = {};
  const extraPolicies: { roles: string[]; statements: string[] }[] = [];

  for (const [label, r] of Object.entries(t.resources)) {
    const props = r.properties;
    const type = r.type === 'AWS::Serverless::Function' ? 'AWS::Lambda::Function' : r.type;
    if (type !== 'AWS::Lambda::EventSourceMapping') {
      model.resources.push(`${type} ${label}`);
    }
    if (r.deletionPolicy || r.updateReplacePolicy) {
      model.removal[label] = `${r.deletionPolicy ?? '-'}/${r.updateReplacePolicy ?? '-'}`;
    }
    const checkov = (r.metadata.checkov ?? {}) as JsonObject;
    const skips = asList(checkov.skip).map((s) => String((s as JsonObject).id));
    if (skips.length > 0) {
      model.checkovSkips[label] = skips.sort();
    }

    switch (type) {
      case 'AWS::Lambda::Function': {
        const isSam = r.type === 'AWS::Serverless::Function';
        const deadLetter = (isSam ? props.DeadLetterQueue : props.DeadLetterConfig) as JsonObject | undefined;
        model.functions[label] = {
          Description: props.Description ?? null,
          Runtime: props.Runtime,
          Architectures: props.Architectures,
          Handler: props.Handler,
          MemorySize: props.MemorySize,
          Timeout: props.Timeout,
          EphemeralStorage: props.EphemeralStorage ?? null,
          Role: props.Role,
          LoggingConfig: props.LoggingConfig,
          DeadLetterTarget: deadLetter?.TargetArn ?? null,
        };
        model.environment[label] = (((props.Environment ?? {}) as JsonObject).Variables ?? {}) as Record<string, Json>;
        if (isSam) {
          for (const event of Object.values((props.Events ?? {}) as Record<string, JsonObject>)) {
            const e = event.Properties as JsonObject;
            if (event.Type !== 'SQS') {
              throw new Error(`${label}: unexpected ${String(event.Type)} event`);
            }
            model.eventSources.push(
              eventSource(label, e.Queue, e.BatchSize, e.FunctionResponseTypes, e.ScalingConfig),
            );
          }
        }
        break;
      }
      case 'AWS::Lambda::EventSourceMapping':
        model.eventSources.push(
          eventSource(
            refLabel(props.FunctionName),
            props.EventSourceArn,
            props.BatchSize,
            props.FunctionResponseTypes,
            props.ScalingConfig,
          ),
        );
        break;
      case 'AWS::SQS::Queue':
        model.queues[label] = {
          SqsManagedSseEnabled: props.SqsManagedSseEnabled ?? null,
          KmsMasterKeyId: props.KmsMasterKeyId ?? null,
          VisibilityTimeout: props.VisibilityTimeout ?? null,
          MessageRetentionPeriod: props.MessageRetentionPeriod ?? null,
          RedrivePolicy: props.RedrivePolicy ?? null,
        };
        break;
      case 'AWS::SQS::QueuePolicy':
      case 'AWS::S3::BucketPolicy':
        model.resourcePolicies[label] = {
          targets: asList(props.Queues ?? props.Bucket).map(String).sort(),
          statements: statements(props.PolicyDocument),
        };
        break;
      case 'AWS::S3::Bucket': {
        model.buckets[label] = props;
        const notifications = (props.NotificationConfiguration ?? {}) as JsonObject;
        for (const q of asList(notifications.QueueConfigurations) as JsonObject[]) {
          const rules = ((((q.Filter ?? {}) as JsonObject).S3Key ?? {}) as JsonObject).Rules;
          model.triggers.push(
            canonical({ kind: 's3-notification', source: `{${label}}`, event: q.Event, filter: rules, queue: q.Queue }),
          );
        }
        break;
      }
      case 'AWS::Events::Rule':
        for (const target of asList(props.Targets) as JsonObject[]) {
          model.triggers.push(
            canonical({ kind: 'eventbridge', rule: label, pattern: props.EventPattern, queue: target.Arn, id: target.Id }),
          );
        }
        break;
      case 'AWS::Logs::LogGroup':
        model.logGroups[label] = { RetentionInDays: props.RetentionInDays ?? null };
        break;
      case 'AWS::IAM::Role': {
        const own = asList(props.Policies).flatMap((p) => statements((p as JsonObject).PolicyDocument));
        roleStatements[label] = own;
        model.roles[label] = { assume: statements(props.AssumeRolePolicyDocument), statements: [] };
        if (props.ManagedPolicyArns !== undefined) {
          throw new Error(`${label}: managed policies are not allowed (least privilege)`);
        }
        break;
      }
      case 'AWS::IAM::Policy':
        extraPolicies.push({ roles: asList(props.Roles).map(refLabel), statements: statements(props.PolicyDocument) });
        break;
      case 'AWS::CloudWatch::Alarm':
        model.alarms[label] = {
          Namespace: props.Namespace,
          MetricName: props.MetricName,
          Dimensions: props.Dimensions,
          Statistic: props.Statistic,
          Period: props.Period,
          EvaluationPeriods: props.EvaluationPeriods,
          Threshold: props.Threshold,
          ComparisonOperator: props.ComparisonOperator,
          TreatMissingData: props.TreatMissingData,
          AlarmActions: props.AlarmActions ?? [],
          OKActions: props.OKActions ?? [],
        };
        break;
      case 'AWS::Scheduler::Schedule':
      case 'AWS::Glue::Database':
      case 'AWS::Glue::Table':
        model.catalog[label] = canonical(props);
        break;
      case 'AWS::CloudWatch::Dashboard':
        model.dashboards[label] = JSON.parse(String(props.DashboardBody)) as Json;
        break;
      default:
        break;
    }
  }
  for (const extra of extraPolicies) {
    for (const role of extra.roles) {
      roleStatements[role] = [...(roleStatements[role] ?? []), ...extra.statements];
    }
  }
  for (const [role, list] of Object.entries(roleStatements)) {
    model.roles[role].statements = [...list].sort();
  }
  for (const [fn, f] of Object.entries(model.functions)) {
    const role = refLabel(f.Role);
    const actions = new Set<string>();
    for (const s of model.roles[role]?.statements ?? []) {
      const parsed = JSON.parse(s) as { Effect: string; Action: string[] };
      if (parsed.Effect === 'Allow') {
        parsed.Action.forEach((a) => actions.add(a));
      }
    }
    model.iamActions[fn] = [...actions].sort();
  }
  model.resources.sort();
  model.eventSources.sort();
  model.triggers.sort();
  return model;
}

function eventSource(fn: string, queue: Json, batchSize: Json, responseTypes: Json, scaling: Json): string {
  return canonical({
    function: fn,
    queue,
    batchSize: batchSize ?? null,
    reportBatchItemFailures: asList(responseTypes).includes('ReportBatchItemFailures'),
    maxConcurrency: ((scaling ?? {}) as JsonObject).MaximumConcurrency ?? null,
  });
}
