//! Turns a Lambda invocation payload into the S3 objects it names, for the three shapes that can
//! start a function: a direct S3 notification, SQS messages wrapping one (or wrapping an
//! EventBridge event), and an EventBridge "Object Created" event. Keys are decoded here, per
//! shape, so no caller ever sees an encoded key: S3 notifications (direct, or wrapped in SQS or
//! SNS) carry form-encoded keys (`+` is a space, `%2B` a plus, `%xx` a byte, see
//! [`decode_s3_key`]); EventBridge events do not use form encoding (a `+` is a literal plus;
//! only `%xx` escapes are decoded, see [`decode_eventbridge_key`]). Each [`ObjectRef`] keeps the
//! key as received beside the decoded one, so a missing object can be reported with both.
//! `s3:TestEvent` notifications name no object and are acknowledged with an empty list.

use aws_lambda_events::event::sqs::SqsEvent;
use serde::Deserialize;
use serde_json::Value;

use crate::s3_uri::S3Uri;

/// One S3 object an invocation asks the function to process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectRef {
    /// Where the object is, key decoded.
    pub uri: S3Uri,
    /// The key exactly as the event carried it (still encoded), for reports about the object.
    pub key_received: String,
    /// Version id when the bucket is versioned.
    pub version_id: Option<String>,
    /// ETag as the notification gave it (quotes removed).
    pub etag: Option<String>,
    /// Size in bytes, when the notification gave it.
    pub size: Option<i64>,
    /// The S3 event name (`ObjectCreated:Put`, `Object Created`, ...).
    pub event_name: String,
}

/// Which envelope the invocation arrived in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TriggerShape {
    /// The S3 notification itself.
    S3,
    /// SQS messages, each wrapping a notification; failures are reported per message.
    Sqs,
    /// An EventBridge event from S3.
    EventBridge,
}

/// A unit of acknowledgement: one SQS message, or the whole payload for the other shapes.
#[derive(Debug, Clone, PartialEq)]
pub struct TriggerItem {
    /// The SQS message id, used in `batchItemFailures`.
    pub message_id: Option<String>,
    /// The objects this item names, or why it could not be read.
    pub objects: Result<Vec<ObjectRef>, TriggerError>,
}

/// A parsed invocation.
#[derive(Debug, Clone, PartialEq)]
pub struct Invocation {
    /// The envelope.
    pub shape: TriggerShape,
    /// Items in arrival order.
    pub items: Vec<TriggerItem>,
}

/// Why a payload (or one SQS message of it) names no object we can process.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TriggerError {
    /// The payload is none of the three shapes.
    #[error("unrecognised invocation payload: {0}")]
    UnknownShape(String),
    /// The payload claims a shape but does not match it.
    #[error("malformed {shape} payload: {reason}")]
    Malformed {
        /// Which shape was expected.
        shape: &'static str,
        /// What was wrong.
        reason: String,
    },
    /// A key is not valid percent-encoded UTF-8.
    #[error("object key {0:?} is not valid URL-encoded UTF-8")]
    BadKey(String),
}

/// Decodes a key as S3 notifications (direct, SQS- or SNS-wrapped) encode it, form encoding:
/// `+` is a space, `%2B` a plus and `%xx` a byte.
pub fn decode_s3_key(raw: &str) -> Result<String, TriggerError> {
    let plus_decoded = raw.replace('+', " ");
    percent_encoding::percent_decode_str(&plus_decoded)
        .decode_utf8()
        .map(|s| s.into_owned())
        .map_err(|_| TriggerError::BadKey(raw.to_string()))
}

/// Decodes a key as EventBridge "Object Created" events carry it: not form-encoded, so a `+`
/// is a literal plus; only `%xx` escapes are decoded.
pub fn decode_eventbridge_key(raw: &str) -> Result<String, TriggerError> {
    percent_encoding::percent_decode_str(raw)
        .decode_utf8()
        .map(|s| s.into_owned())
        .map_err(|_| TriggerError::BadKey(raw.to_string()))
}

impl ObjectRef {
    /// An object named directly (CLI, tests): the key as received is the decoded key.
    pub fn named(uri: S3Uri, event_name: impl Into<String>) -> Self {
        Self {
            key_received: uri.key.clone(),
            uri,
            version_id: None,
            etag: None,
            size: None,
            event_name: event_name.into(),
        }
    }
}

/// Reads any supported invocation payload.
pub fn parse_invocation(payload: &Value) -> Result<Invocation, TriggerError> {
    if is_sqs(payload) {
        let event: SqsEvent =
            serde_json::from_value(payload.clone()).map_err(|e| TriggerError::Malformed {
                shape: "SQS",
                reason: e.to_string(),
            })?;
        let items = event
            .records
            .into_iter()
            .map(|m| TriggerItem {
                message_id: m.message_id,
                objects: match m.body {
                    Some(body) => parse_sqs_body(&body),
                    None => Err(TriggerError::Malformed {
                        shape: "SQS",
                        reason: "message has no body".into(),
                    }),
                },
            })
            .collect();
        return Ok(Invocation {
            shape: TriggerShape::Sqs,
            items,
        });
    }
    let (shape, objects) = parse_notification(payload)?;
    Ok(Invocation {
        shape,
        items: vec![TriggerItem {
            message_id: None,
            objects: Ok(objects),
        }],
    })
}

fn is_sqs(payload: &Value) -> bool {
    payload
        .get("Records")
        .and_then(Value::as_array)
        .and_then(|r| r.first())
        .and_then(|r| r.get("eventSource"))
        .and_then(Value::as_str)
        == Some("aws:sqs")
}

fn parse_sqs_body(body: &str) -> Result<Vec<ObjectRef>, TriggerError> {
    let value: Value = serde_json::from_str(body).map_err(|e| TriggerError::Malformed {
        shape: "SQS",
        reason: format!("message body is not JSON: {e}"),
    })?;
    // SNS fan-out wraps the notification once more, in `Message`.
    if value.get("Type").and_then(Value::as_str) == Some("Notification")
        && let Some(inner) = value.get("Message").and_then(Value::as_str)
    {
        return parse_sqs_body(inner);
    }
    parse_notification(&value).map(|(_, objects)| objects)
}

/// Parses an S3 notification, a test event or an EventBridge event (not SQS).
fn parse_notification(value: &Value) -> Result<(TriggerShape, Vec<ObjectRef>), TriggerError> {
    if value.get("Event").and_then(Value::as_str) == Some("s3:TestEvent") {
        return Ok((TriggerShape::S3, Vec::new()));
    }
    if value.get("source").and_then(Value::as_str) == Some("aws.s3")
        && value.get("detail").is_some()
    {
        return parse_eventbridge(value).map(|o| (TriggerShape::EventBridge, o));
    }
    if value.get("Records").is_some() {
        // Read leniently: only the fields we use (test and third-party emitters omit others).
        let event: S3Notification =
            serde_json::from_value(value.clone()).map_err(|e| TriggerError::Malformed {
                shape: "S3",
                reason: e.to_string(),
            })?;
        let mut out = Vec::with_capacity(event.records.len());
        for r in event.records {
            if !r.event_name.starts_with("ObjectCreated") {
                continue;
            }
            out.push(ObjectRef {
                uri: S3Uri::new(r.s3.bucket.name, decode_s3_key(&r.s3.object.key)?),
                key_received: r.s3.object.key,
                version_id: r.s3.object.version_id.filter(|v| !v.is_empty()),
                etag: r.s3.object.e_tag.map(|e| e.trim_matches('"').to_string()),
                size: r.s3.object.size,
                event_name: r.event_name,
            });
        }
        return Ok((TriggerShape::S3, out));
    }
    let preview: String = value.to_string().chars().take(200).collect();
    Err(TriggerError::UnknownShape(preview))
}

#[derive(Deserialize)]
struct S3Notification {
    #[serde(rename = "Records")]
    records: Vec<S3Record>,
}
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct S3Record {
    #[serde(default)]
    event_name: String,
    s3: S3Entity,
}
#[derive(Deserialize)]
struct S3Entity {
    bucket: EbBucket,
    object: S3Object,
}
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct S3Object {
    key: String,
    size: Option<i64>,
    e_tag: Option<String>,
    version_id: Option<String>,
}

#[derive(Deserialize)]
struct EbDetail {
    bucket: EbBucket,
    object: EbObject,
}
#[derive(Deserialize)]
struct EbBucket {
    name: String,
}
#[derive(Deserialize)]
struct EbObject {
    key: String,
    size: Option<i64>,
    etag: Option<String>,
    #[serde(rename = "version-id")]
    version_id: Option<String>,
}

fn parse_eventbridge(value: &Value) -> Result<Vec<ObjectRef>, TriggerError> {
    let detail_type = value
        .get("detail-type")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string();
    if detail_type != "Object Created" {
        return Ok(Vec::new());
    }
    let detail: EbDetail = value
        .get("detail")
        .cloned()
        .map(serde_json::from_value)
        .transpose()
        .map_err(|e| TriggerError::Malformed {
            shape: "EventBridge",
            reason: e.to_string(),
        })?
        .ok_or_else(|| TriggerError::Malformed {
            shape: "EventBridge",
            reason: "no detail".into(),
        })?;
    // EventBridge does not form-encode keys: a `+` is a plus, only `%xx` is an escape.
    Ok(vec![ObjectRef {
        uri: S3Uri::new(
            detail.bucket.name,
            decode_eventbridge_key(&detail.object.key)?,
        ),
        key_received: detail.object.key,
        version_id: detail.object.version_id.filter(|v| !v.is_empty()),
        etag: detail.object.etag.map(|e| e.trim_matches('"').to_string()),
        size: detail.object.size,
        event_name: detail_type,
    }])
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn s3_notification(key: &str) -> Value {
        json!({"Records": [{
            "eventVersion": "2.1", "eventSource": "aws:s3", "awsRegion": "us-east-1",
            "eventTime": "2026-11-29T00:00:00.000Z", "eventName": "ObjectCreated:Put",
            "s3": {"s3SchemaVersion": "1.0", "configurationId": "c",
                   "bucket": {"name": "exports", "arn": "arn:aws:s3:::exports"},
                   "object": {"key": key, "size": 12, "eTag": "\"abc\"", "sequencer": "01"}}
        }]})
    }

    /// A key with every character that encodings disagree on.
    const HARD_KEY: &str = "amperity/customers/export+v2 2026-11-30 100%=é.csv";

    /// Form encoding, as S3 notifications carry keys.
    fn form_encode(key: &str) -> String {
        crate::s3_uri::encode_key(key)
            .replace("%20", "+")
            .replace("%2F", "/")
    }

    /// EventBridge's encoding: not form encoding; `+` and `=` stay literal, other specials are
    /// `%xx` escapes.
    fn eventbridge_encode(key: &str) -> String {
        crate::s3_uri::encode_key(key)
            .replace("%2B", "+")
            .replace("%3D", "=")
    }

    fn eventbridge_event(raw_key: &str) -> Value {
        json!({
            "version": "0", "id": "x", "detail-type": "Object Created", "source": "aws.s3",
            "account": "1", "time": "2026-11-29T00:00:00Z", "region": "us-east-1",
            "resources": ["arn:aws:s3:::exports"],
            "detail": {"version": "0", "bucket": {"name": "exports"},
                       "object": {"key": raw_key, "size": 3, "etag": "e"}, "reason": "PutObject"}
        })
    }

    fn sqs_wrapping(body: &Value) -> Value {
        json!({"Records": [{"messageId": "m1", "receiptHandle": "r", "body": body.to_string(),
            "eventSource": "aws:sqs", "eventSourceARN": "arn:aws:sqs:us-east-1:1:q",
            "awsRegion": "us-east-1", "attributes": {}, "messageAttributes": {}, "md5OfBody": ""}]})
    }

    fn only_object(inv: &Invocation) -> ObjectRef {
        let objs = inv.items[0].objects.clone().unwrap();
        assert_eq!(objs.len(), 1);
        objs[0].clone()
    }

    #[test]
    fn keys_are_decoded_per_shape_with_plus_space_percent_equals_and_non_ascii() {
        let form = form_encode(HARD_KEY);
        assert_eq!(
            form,
            "amperity/customers/export%2Bv2+2026-11-30+100%25%3D%C3%A9.csv"
        );
        let eb = eventbridge_encode(HARD_KEY);
        assert_eq!(
            eb,
            "amperity/customers/export+v2%202026-11-30%20100%25=%C3%A9.csv"
        );
        let shapes = [
            ("S3", s3_notification(&form), form.clone(), TriggerShape::S3),
            (
                "SQS(S3)",
                sqs_wrapping(&s3_notification(&form)),
                form.clone(),
                TriggerShape::Sqs,
            ),
            (
                "EventBridge",
                eventbridge_event(&eb),
                eb.clone(),
                TriggerShape::EventBridge,
            ),
            (
                "SQS(EventBridge)",
                sqs_wrapping(&eventbridge_event(&eb)),
                eb.clone(),
                TriggerShape::Sqs,
            ),
        ];
        for (name, payload, raw, shape) in shapes {
            let inv = parse_invocation(&payload).unwrap();
            assert_eq!(inv.shape, shape, "{name}");
            let o = only_object(&inv);
            assert_eq!(o.uri.key, HARD_KEY, "{name}");
            assert_eq!(o.key_received, raw, "{name}");
        }
    }

    #[test]
    fn eventbridge_plus_is_a_literal_plus_but_s3_plus_is_a_space() {
        let eb = parse_invocation(&eventbridge_event("a/export+v2.csv")).unwrap();
        assert_eq!(only_object(&eb).uri.key, "a/export+v2.csv");
        let s3 = parse_invocation(&s3_notification("a/export+v2.csv")).unwrap();
        assert_eq!(only_object(&s3).uri.key, "a/export v2.csv");
        assert_eq!(decode_eventbridge_key("a%2Bb+c%20d").unwrap(), "a+b+c d");
        assert!(matches!(
            decode_eventbridge_key("%FF"),
            Err(TriggerError::BadKey(_))
        ));
    }

    #[test]
    fn key_with_plus_is_decoded_to_space() {
        assert_eq!(decode_s3_key("a+b%2Bc%3D%C3%A9").unwrap(), "a b+c=é");
    }

    #[test]
    fn bad_percent_encoding_is_an_error() {
        assert!(matches!(
            decode_s3_key("%FF%FE"),
            Err(TriggerError::BadKey(_))
        ));
    }

    #[test]
    fn direct_s3_notification_names_its_object() {
        let inv = parse_invocation(&s3_notification("in/my+file.csv")).unwrap();
        assert_eq!(inv.shape, TriggerShape::S3);
        let objs = inv.items[0].objects.clone().unwrap();
        assert_eq!(objs[0].uri.to_string(), "s3://exports/in/my file.csv");
        assert_eq!(objs[0].etag.as_deref(), Some("abc"));
    }

    #[test]
    fn sqs_batch_parses_each_message_alone() {
        let good = s3_notification("a.csv").to_string();
        let payload = json!({"Records": [
            {"messageId": "m1", "receiptHandle": "r", "body": good, "eventSource": "aws:sqs",
             "eventSourceARN": "arn:aws:sqs:us-east-1:1:q", "awsRegion": "us-east-1",
             "attributes": {}, "messageAttributes": {}, "md5OfBody": ""},
            {"messageId": "m2", "receiptHandle": "r", "body": "not json", "eventSource": "aws:sqs",
             "eventSourceARN": "arn:aws:sqs:us-east-1:1:q", "awsRegion": "us-east-1",
             "attributes": {}, "messageAttributes": {}, "md5OfBody": ""}
        ]});
        let inv = parse_invocation(&payload).unwrap();
        assert_eq!(inv.shape, TriggerShape::Sqs);
        assert_eq!(inv.items.len(), 2);
        assert!(inv.items[0].objects.is_ok());
        assert_eq!(inv.items[1].message_id.as_deref(), Some("m2"));
        assert!(inv.items[1].objects.is_err());
    }

    #[test]
    fn eventbridge_object_created_is_read() {
        let payload = json!({
            "version": "0", "id": "x", "detail-type": "Object Created", "source": "aws.s3",
            "account": "1", "time": "2026-11-29T00:00:00Z", "region": "us-east-1",
            "resources": ["arn:aws:s3:::exports"],
            "detail": {"version": "0", "bucket": {"name": "exports"},
                       "object": {"key": "x/y%20z.csv", "size": 3, "etag": "e", "version-id": "v1"},
                       "reason": "PutObject"}
        });
        let inv = parse_invocation(&payload).unwrap();
        assert_eq!(inv.shape, TriggerShape::EventBridge);
        let o = &inv.items[0].objects.as_ref().unwrap()[0];
        assert_eq!(o.uri.key, "x/y z.csv");
        assert_eq!(o.key_received, "x/y%20z.csv");
        assert_eq!(o.version_id.as_deref(), Some("v1"));
    }

    #[test]
    fn test_event_names_no_object() {
        let payload = json!({"Service": "Amazon S3", "Event": "s3:TestEvent",
                             "Time": "2026-11-29T00:00:00Z", "Bucket": "exports"});
        let inv = parse_invocation(&payload).unwrap();
        assert!(inv.items[0].objects.as_ref().unwrap().is_empty());
    }

    #[test]
    fn unknown_payload_is_an_error() {
        assert!(matches!(
            parse_invocation(&json!({"hello": 1})),
            Err(TriggerError::UnknownShape(_))
        ));
    }
}
