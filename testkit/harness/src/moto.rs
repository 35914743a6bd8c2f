//! moto's server on a loopback port as the S3 and SQS endpoint, started and stopped by us, with
//! SDK clients that reach it through `AWS_ENDPOINT_URL`-style configuration (path-style S3).

use std::time::Duration;

use anyhow::Context;
use tokio::process::{Child, Command};

use crate::paths;

/// A running moto server; killed when dropped.
pub struct Moto {
    child: Child,
    /// `http://127.0.0.1:<port>`.
    pub endpoint: String,
    /// S3 client pointed at moto.
    pub s3: aws_sdk_s3::Client,
    /// SQS client pointed at moto.
    pub sqs: aws_sdk_sqs::Client,
}

/// The environment a process needs to reach the local stack with the AWS SDK.
pub fn aws_env(endpoint: &str) -> Vec<(String, String)> {
    [
        ("AWS_ENDPOINT_URL", endpoint),
        ("AWS_ACCESS_KEY_ID", "test"),
        ("AWS_SECRET_ACCESS_KEY", "test"),
        ("AWS_REGION", "us-east-1"),
        ("AWS_DEFAULT_REGION", "us-east-1"),
        ("AWS_EC2_METADATA_DISABLED", "true"),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect()
}

impl Moto {
    /// Starts moto on a free port (or `port`) and waits until it answers.
    pub async fn start(port: Option<u16>) -> anyhow::Result<Self> {
        let port = match port {
            Some(p) => p,
            None => paths::free_port()?,
        };
        let bin = paths::venv_tool("moto_server")?;
        let child = Command::new(bin)
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .context("starting moto_server")?;
        let endpoint = format!("http://127.0.0.1:{port}");
        let conf = sdk_config(&endpoint).await;
        let s3 = aws_sdk_s3::Client::from_conf(
            aws_sdk_s3::config::Builder::from(&conf)
                .force_path_style(true)
                .build(),
        );
        let sqs = aws_sdk_sqs::Client::new(&conf);
        let moto = Self {
            child,
            endpoint,
            s3,
            sqs,
        };
        moto.wait_ready().await?;
        Ok(moto)
    }

    async fn wait_ready(&self) -> anyhow::Result<()> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            if self.s3.list_buckets().send().await.is_ok() {
                return Ok(());
            }
            if tokio::time::Instant::now() > deadline {
                anyhow::bail!("moto did not answer on {} within 30 s", self.endpoint);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Creates a bucket.
    pub async fn create_bucket(&self, name: &str) -> anyhow::Result<()> {
        self.s3.create_bucket().bucket(name).send().await?;
        Ok(())
    }

    /// Creates a queue with a dead-letter queue (`<name>-dlq`, after `max_receives`) and returns
    /// (queue url, queue arn, dlq url).
    pub async fn create_queue_with_dlq(
        &self,
        name: &str,
        visibility_timeout_s: u32,
        max_receives: u32,
    ) -> anyhow::Result<(String, String, String)> {
        let dlq_url = self
            .sqs
            .create_queue()
            .queue_name(format!("{name}-dlq"))
            .send()
            .await?
            .queue_url
            .context("no dlq url")?;
        let dlq_arn = self.queue_arn(&dlq_url).await?;
        let redrive = serde_json::json!({"deadLetterTargetArn": dlq_arn, "maxReceiveCount": max_receives.to_string()});
        let url = self
            .sqs
            .create_queue()
            .queue_name(name)
            .attributes(
                aws_sdk_sqs::types::QueueAttributeName::VisibilityTimeout,
                visibility_timeout_s.to_string(),
            )
            .attributes(
                aws_sdk_sqs::types::QueueAttributeName::RedrivePolicy,
                redrive.to_string(),
            )
            .send()
            .await?
            .queue_url
            .context("no queue url")?;
        let arn = self.queue_arn(&url).await?;
        Ok((url, arn, dlq_url))
    }

    async fn queue_arn(&self, url: &str) -> anyhow::Result<String> {
        let attrs = self
            .sqs
            .get_queue_attributes()
            .queue_url(url)
            .attribute_names(aws_sdk_sqs::types::QueueAttributeName::QueueArn)
            .send()
            .await?;
        attrs
            .attributes()
            .and_then(|a| a.get(&aws_sdk_sqs::types::QueueAttributeName::QueueArn))
            .cloned()
            .context("queue has no ARN")
    }

    /// Makes `bucket` publish ObjectCreated notifications for keys under `prefix` to a queue.
    pub async fn notify_queue(
        &self,
        bucket: &str,
        prefix: &str,
        queue_arn: &str,
    ) -> anyhow::Result<()> {
        use aws_sdk_s3::types::{
            Event, FilterRule, FilterRuleName, NotificationConfiguration,
            NotificationConfigurationFilter, QueueConfiguration, S3KeyFilter,
        };
        let filter = NotificationConfigurationFilter::builder()
            .key(
                S3KeyFilter::builder()
                    .filter_rules(
                        FilterRule::builder()
                            .name(FilterRuleName::Prefix)
                            .value(prefix)
                            .build(),
                    )
                    .build(),
            )
            .build();
        let qc = QueueConfiguration::builder()
            .queue_arn(queue_arn)
            .events(Event::S3ObjectCreated)
            .filter(filter)
            .build()?;
        self.s3
            .put_bucket_notification_configuration()
            .bucket(bucket)
            .notification_configuration(
                NotificationConfiguration::builder()
                    .queue_configurations(qc)
                    .build(),
            )
            .send()
            .await?;
        Ok(())
    }

    /// Uploads an object.
    pub async fn put(&self, bucket: &str, key: &str, body: Vec<u8>) -> anyhow::Result<()> {
        self.s3
            .put_object()
            .bucket(bucket)
            .key(key)
            .body(body.into())
            .send()
            .await
            .with_context(|| format!("uploading s3://{bucket}/{key}"))?;
        Ok(())
    }

    /// Reads an object.
    pub async fn get(&self, bucket: &str, key: &str) -> anyhow::Result<Vec<u8>> {
        let out = self
            .s3
            .get_object()
            .bucket(bucket)
            .key(key)
            .send()
            .await
            .with_context(|| format!("reading s3://{bucket}/{key}"))?;
        Ok(out.body.collect().await?.into_bytes().to_vec())
    }

    /// Every key under a prefix, in order.
    pub async fn list(&self, bucket: &str, prefix: &str) -> anyhow::Result<Vec<String>> {
        let mut keys = Vec::new();
        let mut pages = self
            .s3
            .list_objects_v2()
            .bucket(bucket)
            .prefix(prefix)
            .into_paginator()
            .send();
        while let Some(page) = pages.next().await {
            for o in page?.contents() {
                if let Some(k) = o.key() {
                    keys.push(k.to_string());
                }
            }
        }
        keys.sort();
        Ok(keys)
    }

    /// Creates a Secrets Manager secret holding `value`, or gives an existing one that value
    /// (an operator fixing or rotating the Braze API key). Returns the secret's ARN.
    pub async fn put_secret(&self, name: &str, value: &str) -> anyhow::Result<String> {
        let sm = aws_sdk_secretsmanager::Client::new(&sdk_config(&self.endpoint).await);
        let created = sm
            .create_secret()
            .name(name)
            .secret_string(value)
            .send()
            .await;
        match created {
            Ok(out) => Ok(out.arn().unwrap_or(name).to_string()),
            Err(_) => {
                let out = sm
                    .put_secret_value()
                    .secret_id(name)
                    .secret_string(value)
                    .send()
                    .await
                    .with_context(|| format!("updating the secret {name}"))?;
                Ok(out.arn().unwrap_or(name).to_string())
            }
        }
    }

    /// Stops the server.
    pub async fn stop(mut self) {
        let _ = self.child.kill().await;
    }
}

/// SDK config for a local endpoint with dummy credentials.
pub async fn sdk_config(endpoint: &str) -> aws_config::SdkConfig {
    aws_config::defaults(aws_config::BehaviorVersion::latest())
        .endpoint_url(endpoint)
        .region(aws_config::Region::new("us-east-1"))
        .credentials_provider(aws_sdk_s3::config::Credentials::new(
            "test", "test", None, None, "local",
        ))
        .load()
        .await
}
