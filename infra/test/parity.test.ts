/**
 * Holds the CDK construct and template.yaml to the same deployment: for each scenario the
 * template is evaluated with the parameters equal to the construct's props, and both are reduced
 * to one model (functions, environment, SQS triggers, S3/EventBridge triggers, queues, queue and
 * bucket policies, buckets, log groups, IAM, alarms, removal policies, checkov skips).
 */
import assert from 'node:assert/strict';
import { describe, test } from 'node:test';

import * as fs from 'node:fs';

import { BRAZE_BRIDGE_DEFAULTS, BRAZE_BRIDGE_PARAMETER_PROPS, BrazeBridgeProps, DASHBOARD_JSON, FUNCTION_SIZING } from '../lib/braze-bridge';
import { BridgeModel, bridgeModel, cdkLabel, evaluateTemplate, loadYamlTemplate } from './cfn-model';
import { CONSTRUCT_ID, SECRET_ARN, TEMPLATE_YAML, parametersFor, synth } from './helpers';

const yamlTemplate = loadYamlTemplate(TEMPLATE_YAML);

const SCENARIOS: Record<string, Partial<BrazeBridgeProps>> = {
  'new buckets, defaults': {},
  'existing buckets, alarm topic, endpoint and tuning given': {
    exportsBucketName: 'acme-amperity-exports',
    exportsPrefix: 'exports/braze/',
    stateBucketName: 'acme-bridge-state',
    statePrefix: 'state/',
    reportsPrefix: 'reports/',
    rejectsPrefix: 'rejects/',
    routesBucketName: 'acme-bridge-config',
    routesPrefix: 'routes/',
    currentsBucketName: 'acme-braze-currents',
    currentsPrefix: 'braze/currents/',
    tablesBucketName: 'acme-amperity-ingest',
    tablesPrefix: 'braze/tables/',
    quarantinePrefix: 'braze/quarantine/',
    currentsReportsPrefix: 'braze/reports/',
    brazeInstance: 'EU-02',
    brazeRestEndpoint: 'https://rest.fra-02.braze.eu',
    rateLimitShare: 0.5,
    brazeRateLimitRequests: 1500,
    brazeRateLimitWindowSecs: 3,
    brazeMaxObjectsPerRequest: 50,
    brazeHourlyRequestLimit: 100000,
    brazeSyncMaxConcurrency: 3,
    currentsNormalizeMaxConcurrency: 20,
    logLevel: 'debug',
    logRetentionDays: 90,
    alarmTopicArn: 'arn:aws:sns:eu-central-1:123456789012:ops-alarms',
    auditRoutes: 'customers,loyalty',
    auditSchedule: 'cron(0 5 ? * SUN *)',
    auditSample: 500,
    driftAlarmShare: 0.05,
  },
  'one shared existing bucket for everything': {
    exportsBucketName: 'acme-data',
    stateBucketName: 'acme-data',
    currentsBucketName: 'acme-data',
    tablesBucketName: 'acme-data',
  },
  'existing exports and tables, new Currents and state': {
    exportsBucketName: 'acme-amperity-exports',
    tablesBucketName: 'acme-amperity-ingest',
  },
};

function models(props: Partial<BrazeBridgeProps>): { cdk: BridgeModel; sam: BridgeModel } {
  const parameters = { BrazeApiKeySecretArn: SECRET_ARN, ...parametersFor(props) };
  return {
    cdk: bridgeModel(evaluateTemplate(synth(props).toJSON(), {}, cdkLabel(CONSTRUCT_ID))),
    sam: bridgeModel(evaluateTemplate(yamlTemplate, parameters)),
  };
}

for (const [name, props] of Object.entries(SCENARIOS)) {
  describe(`construct and template.yaml agree: ${name}`, () => {
    const { cdk, sam } = models(props);

    test('same resources (type and logical id)', () => assert.deepEqual(cdk.resources, sam.resources));
    test('same functions: runtime, architecture, memory, timeout, role, logging, DLQ', () =>
      assert.deepEqual(cdk.functions, sam.functions));
    test('same environment variables, names and values', () => assert.deepEqual(cdk.environment, sam.environment));
    test('same SQS event sources with ReportBatchItemFailures', () => {
      assert.deepEqual(cdk.eventSources, sam.eventSources);
      assert.equal(sam.eventSources.length, 2);
      assert.ok(sam.eventSources.every((e) => JSON.parse(e).reportBatchItemFailures === true));
    });
    test('same bucket triggers (S3 notification or EventBridge rule)', () => {
      assert.deepEqual(cdk.triggers, sam.triggers);
      assert.equal(sam.triggers.length, 2);
    });
    test('same queues and dead-letter redrive', () => assert.deepEqual(cdk.queues, sam.queues));
    test('same queue and bucket policies', () => assert.deepEqual(cdk.resourcePolicies, sam.resourcePolicies));
    test('same buckets', () => assert.deepEqual(cdk.buckets, sam.buckets));
    test('same log groups', () => assert.deepEqual(cdk.logGroups, sam.logGroups));
    test('same IAM statements per role', () => assert.deepEqual(cdk.roles, sam.roles));
    test('same IAM actions per function', () => assert.deepEqual(cdk.iamActions, sam.iamActions));
    test('same alarms', () => assert.deepEqual(cdk.alarms, sam.alarms));
    test('same compaction schedule, Glue database and Glue tables', () => {
      assert.deepEqual(cdk.catalog, sam.catalog);
      assert.ok(Object.keys(sam.catalog).length > 3);
      const schedule = JSON.parse(sam.catalog.CurrentsCompactSchedule) as { Target: { Input: string } };
      assert.deepEqual(JSON.parse(schedule.Target.Input), { compact: {} });
    });
    test('same dashboard, from infra/dashboard.json', () => {
      assert.deepEqual(cdk.dashboards, sam.dashboards);
      assert.deepEqual(Object.keys(sam.dashboards), ['OperationsDashboard']);
    });
    test('same removal policies', () => assert.deepEqual(cdk.removal, sam.removal));
    test('same checkov skips', () => assert.deepEqual(cdk.checkovSkips, sam.checkovSkips));
  });
}

describe('construct props and template parameters', () => {
  const parameters = yamlTemplate.Parameters as Record<string, { Default?: unknown }>;

  test('every template parameter is a construct prop and vice versa', () => {
    const fromTemplate = Object.keys(parameters)
      .map((p) => p[0].toLowerCase() + p.slice(1))
      .sort();
    assert.deepEqual(fromTemplate, [...BRAZE_BRIDGE_PARAMETER_PROPS].sort());
  });

  test('defaults are equal', () => {
    for (const [prop, value] of Object.entries(BRAZE_BRIDGE_DEFAULTS)) {
      const parameter = parameters[prop[0].toUpperCase() + prop.slice(1)];
      assert.equal(String(parameter.Default), String(value), prop);
    }
    assert.equal(parameters.BrazeApiKeySecretArn.Default, undefined, 'the secret has no default');
  });

  test('memory and timeout are the sized values', () => {
    const resources = yamlTemplate.Resources as Record<string, { Properties: Record<string, unknown> }>;
    const brazeSync = resources.BrazeSyncFunction.Properties;
    const currents = resources.CurrentsNormalizeFunction.Properties;
    assert.deepEqual([brazeSync.MemorySize, brazeSync.Timeout], [
      FUNCTION_SIZING.brazeSync.memorySize,
      FUNCTION_SIZING.brazeSync.timeoutSeconds,
    ]);
    assert.deepEqual([currents.MemorySize, currents.Timeout], [
      FUNCTION_SIZING.currentsNormalize.memorySize,
      FUNCTION_SIZING.currentsNormalize.timeoutSeconds,
    ]);
    const compact = resources.CurrentsCompactFunction.Properties;
    assert.deepEqual([compact.MemorySize, compact.Timeout, (compact.EphemeralStorage as { Size: number }).Size], [
      FUNCTION_SIZING.currentsCompact.memorySize,
      FUNCTION_SIZING.currentsCompact.timeoutSeconds,
      FUNCTION_SIZING.currentsCompact.ephemeralStorageMiB,
    ]);
  });

  test('template functions build the workspace binaries with cargo-lambda on arm64', () => {
    const resources = yamlTemplate.Resources as Record<string, { Metadata: Record<string, unknown>; Properties: Record<string, unknown> }>;
    for (const [id, binary] of [
      ['BrazeSyncFunction', 'braze-sync'],
      ['CurrentsNormalizeFunction', 'currents-normalize'],
    ]) {
      assert.equal(resources[id].Metadata.BuildMethod, 'rust-cargolambda');
      assert.deepEqual(resources[id].Metadata.BuildProperties, { Binary: binary });
      assert.equal(resources[id].Properties.CodeUri, `functions/${binary}`);
    }
  });
});

describe('operations dashboard', () => {
  const resources = yamlTemplate.Resources as Record<string, { Properties: Record<string, unknown> }>;
  const body = resources.OperationsDashboard.Properties.DashboardBody as { 'Fn::Sub': [string, Record<string, unknown>] };

  test('template.yaml embeds infra/dashboard.json verbatim (edit the file, then paste it into the template)', () => {
    assert.equal(body['Fn::Sub'][0], fs.readFileSync(DASHBOARD_JSON, 'utf8'));
  });

  test('every placeholder of the body is given a value, and every value is used', () => {
    const text = fs.readFileSync(DASHBOARD_JSON, 'utf8');
    const used = new Set([...text.matchAll(/\$\{([^}]+)\}/g)].map((m) => m[1]).filter((n) => !n.startsWith('AWS::')));
    assert.deepEqual([...used].sort(), Object.keys(body['Fn::Sub'][1]).sort());
  });

  test('every metric widget has a title, a region and at least one metric', () => {
    const widgets = (JSON.parse(fs.readFileSync(DASHBOARD_JSON, 'utf8')) as { widgets: { type: string; properties: Record<string, unknown> }[] }).widgets;
    const metricWidgets = widgets.filter((w) => w.type === 'metric');
    assert.ok(metricWidgets.length >= 10);
    for (const w of metricWidgets) {
      assert.ok(typeof w.properties.title === 'string' && w.properties.title.length > 0);
      assert.equal(w.properties.region, '${AWS::Region}');
      assert.ok(Array.isArray(w.properties.metrics) && w.properties.metrics.length > 0, String(w.properties.title));
    }
  });

  test('the stack outputs the dashboard URL', () => {
    const outputs = yamlTemplate.Outputs as Record<string, { Value: { 'Fn::Sub': string } }>;
    assert.match(outputs.DashboardUrl.Value['Fn::Sub'], /#dashboards:name=\$\{OperationsDashboard\}$/);
  });
});
