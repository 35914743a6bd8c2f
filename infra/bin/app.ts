/**
 * Example CDK app: one environment-agnostic stack, `BrazeBridge`, holding the bridge construct.
 *
 * The API key secret is a CloudFormation parameter (`BrazeApiKeySecretArn`), so synthesis needs
 * no account details:
 *
 *   make build                                  # target/lambda/<function>/bootstrap.zip
 *   npx cdk deploy --parameters BrazeApiKeySecretArn=arn:aws:secretsmanager:...:secret:braze-api-key-AbCdEf
 *
 * Every other construct prop can be set as CDK context with its own name, e.g.
 * `-c exportsBucketName=acme-amperity-exports -c exportsPrefix=braze/ -c rateLimitShare=0.5`.
 * `-c stubAssets=true` synthesizes with placeholder function code (CI checks only: never deploy it).
 */
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';

import * as cdk from 'aws-cdk-lib';

import { BRAZE_BRIDGE_DEFAULTS, BrazeBridge, BrazeBridgeProps } from '../lib/braze-bridge';

const app = new cdk.App({ analyticsReporting: false });
const stack = new cdk.Stack(app, 'BrazeBridge', {
  description: 'Amperity <-> Braze bridge (CDK example app; the same resources as template.yaml).',
});

const secretArn = new cdk.CfnParameter(stack, 'BrazeApiKeySecretArn', {
  type: 'String',
  allowedPattern: '^arn:aws[a-z-]*:secretsmanager:[a-z0-9-]+:[0-9]{12}:secret:.+-[A-Za-z0-9]{6}$',
  description: 'Full ARN (with its 6-character suffix) of the Secrets Manager secret holding the Braze REST API key.',
});
cdk.Validations.of(stack).acknowledge({
  id: 'CloudFormation-Validate::W2509',
  reason: 'BrazeApiKeySecretArn is the ARN of the secret, not the key itself: nothing to hide with NoEcho.',
});

/** Construct props read from CDK context (`-c name=value`), typed like the defaults. */
function contextProps(): Partial<BrazeBridgeProps> {
  const props: Record<string, string | number> = {};
  for (const [key, fallback] of Object.entries(BRAZE_BRIDGE_DEFAULTS)) {
    const value: unknown = app.node.tryGetContext(key);
    if (value === undefined) {
      continue;
    }
    if (typeof fallback === 'number') {
      const n = Number(value);
      if (!Number.isFinite(n)) {
        throw new Error(`context ${key} must be a number, got '${String(value)}'`);
      }
      props[key] = n;
    } else {
      props[key] = String(value);
    }
  }
  return props as Partial<BrazeBridgeProps>;
}

/** Placeholder `bootstrap` files, so `cdk synth` checks run without a Rust build. */
function stubCodePaths(): Pick<BrazeBridgeProps, 'brazeSyncCodePath' | 'currentsNormalizeCodePath'> {
  const root = fs.mkdtempSync(path.join(os.tmpdir(), 'braze-bridge-stub-'));
  const dirs = {
    brazeSyncCodePath: path.join(root, 'braze-sync'),
    currentsNormalizeCodePath: path.join(root, 'currents-normalize'),
  };
  for (const dir of Object.values(dirs)) {
    fs.mkdirSync(dir);
    fs.writeFileSync(path.join(dir, 'bootstrap'), '#!/bin/sh\necho "placeholder: run make build" >&2\nexit 1\n', {
      mode: 0o755,
    });
  }
  return dirs;
}

const stub = String(app.node.tryGetContext('stubAssets') ?? 'false') === 'true';

const bridge = new BrazeBridge(stack, 'Bridge', {
  ...contextProps(),
  ...(stub ? stubCodePaths() : {}),
  brazeApiKeySecretArn: secretArn.valueAsString,
});
new cdk.CfnOutput(stack, 'DashboardUrl', {
  description: 'CloudWatch dashboard of both functions (one widget per on-call question).',
  value: bridge.dashboardUrl,
});

app.synth();
