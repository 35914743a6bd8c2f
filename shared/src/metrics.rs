//! CloudWatch Embedded Metric Format: one JSON line per run on stdout, which Lambda ships to
//! CloudWatch Logs where it becomes metrics without any API call.

use serde_json::{Map, Value, json};

/// A metric value and its unit.
#[derive(Debug, Clone, Copy)]
pub enum Metric {
    /// A plain count.
    Count(f64),
    /// A duration in seconds.
    Seconds(f64),
    /// A rate per second.
    PerSecond(f64),
}

impl Metric {
    fn unit(&self) -> &'static str {
        match self {
            Metric::Count(_) => "Count",
            Metric::Seconds(_) => "Seconds",
            Metric::PerSecond(_) => "Count/Second",
        }
    }
    fn value(&self) -> f64 {
        match self {
            Metric::Count(v) | Metric::Seconds(v) | Metric::PerSecond(v) => *v,
        }
    }
}

/// Builds one EMF document for `namespace` with the given dimensions and metrics.
pub fn emf_line(
    namespace: &str,
    dimensions: &[(&str, &str)],
    metrics: &[(&str, Metric)],
    timestamp_ms: i64,
) -> String {
    let mut root = Map::new();
    let dims: Vec<&str> = dimensions.iter().map(|(k, _)| *k).collect();
    let defs: Vec<Value> = metrics
        .iter()
        .map(|(n, m)| json!({"Name": n, "Unit": m.unit()}))
        .collect();
    root.insert(
        "_aws".into(),
        json!({"Timestamp": timestamp_ms,
               "CloudWatchMetrics": [{"Namespace": namespace, "Dimensions": [dims], "Metrics": defs}]}),
    );
    for (k, v) in dimensions {
        root.insert((*k).into(), Value::String((*v).into()));
    }
    for (n, m) in metrics {
        root.insert((*n).into(), json!(m.value()));
    }
    Value::Object(root).to_string()
}

/// Prints an EMF document to stdout.
pub fn emit(namespace: &str, dimensions: &[(&str, &str)], metrics: &[(&str, Metric)]) {
    println!(
        "{}",
        emf_line(
            namespace,
            dimensions,
            metrics,
            chrono::Utc::now().timestamp_millis()
        )
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn emf_line_declares_each_metric_with_its_unit() {
        let line = emf_line(
            "Bridge",
            &[("Route", "r1")],
            &[("rows_in", Metric::Count(3.0))],
            1,
        );
        let v: Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["Route"], "r1");
        assert_eq!(v["rows_in"], 3.0);
        assert_eq!(
            v["_aws"]["CloudWatchMetrics"][0]["Metrics"][0]["Unit"],
            "Count"
        );
        assert_eq!(
            v["_aws"]["CloudWatchMetrics"][0]["Dimensions"][0][0],
            "Route"
        );
    }
}
