/** Test helpers: synthesizing the construct with placeholder code, and loading template.yaml. */
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';

import * as cdk from 'aws-cdk-lib';
import { Template } from 'aws-cdk-lib/assertions';

import { BrazeBridge, BrazeBridgeProps } from '../lib/braze-bridge';

/** The repository's template.yaml. */
export const TEMPLATE_YAML = path.resolve(__dirname, '..', '..', 'template.yaml');

/** A secret ARN of the right shape. */
export const SECRET_ARN = 'arn:aws:secretsmanager:us-east-1:123456789012:secret:braze-api-key-AbCdEf';

/** The construct's id in test stacks (prefix of its resources' logical ids). */
export const CONSTRUCT_ID = 'Bridge';

let codeRoot: string | undefined;

/** A temporary `cargo lambda build`-like layout with placeholder `bootstrap` files. */
export function placeholderCode(): { brazeSyncCodePath: string; currentsNormalizeCodePath: string } {
  if (codeRoot === undefined) {
    codeRoot = fs.mkdtempSync(path.join(os.tmpdir(), 'braze-bridge-test-'));
    for (const name of ['braze-sync', 'currents-normalize']) {
      fs.mkdirSync(path.join(codeRoot, name));
      fs.writeFileSync(path.join(codeRoot, name, 'bootstrap'), '#!/bin/sh\nexit 1\n', { mode: 0o755 });
    }
  }
  return {
    brazeSyncCodePath: path.join(codeRoot, 'braze-sync'),
    currentsNormalizeCodePath: path.join(codeRoot, 'currents-normalize'),
  };
}

/** Synthesizes the construct alone in an environment-agnostic stack. */
export function synth(props: Partial<BrazeBridgeProps> = {}): Template {
  const app = new cdk.App({ analyticsReporting: false });
  const stack = new cdk.Stack(app, 'Test');
  new BrazeBridge(stack, CONSTRUCT_ID, { brazeApiKeySecretArn: SECRET_ARN, ...placeholderCode(), ...props });
  return Template.fromStack(stack);
}

/** Template parameters equal to the given construct props (`exportsPrefix` -> `ExportsPrefix`). */
export function parametersFor(props: Partial<BrazeBridgeProps>): Record<string, string> {
  const out: Record<string, string> = {};
  for (const [key, value] of Object.entries(props)) {
    if (key.endsWith('CodePath') || value === undefined) {
      continue;
    }
    out[key[0].toUpperCase() + key.slice(1)] = String(value);
  }
  return out;
}

/** The resource with label `label` (logical id without the construct prefix and hash). */
export function logicalId(template: Template, label: string): string {
  const ids = Object.keys(template.toJSON().Resources as object).filter((id) =>
    new RegExp(`^${CONSTRUCT_ID}${label}[0-9A-F]{8}$`).test(id),
  );
  if (ids.length !== 1) {
    throw new Error(`expected one resource labelled ${label}, found ${ids.join(', ') || 'none'}`);
  }
  return ids[0];
}
