use super::*;

fn settings(toml_text: &str) -> ObservabilitySettings {
    toml::from_str(toml_text).unwrap()
}

#[test]
fn defaults_and_the_http_signal_urls() {
    let checked = OtlpSettings::from_settings(&settings(
        "otlp_endpoint = \"http://collector:4318/\"\notlp_protocol = \"http/protobuf\"\n",
    ))
    .unwrap()
    .unwrap();
    assert_eq!(checked.endpoint, "http://collector:4318");
    assert_eq!(
        checked.signal_url("traces"),
        "http://collector:4318/v1/traces"
    );
    assert_eq!(checked.interval, DEFAULT_INTERVAL);
    assert_eq!(checked.span_delay(), MAX_SPAN_DELAY);
    assert_eq!(checked.service_name, "toolwarden");

    let grpc = OtlpSettings::from_settings(&settings(
        "otlp_endpoint = \"http://127.0.0.1:4317\"\notlp_interval = \"1s\"\nservice_name = \"edge\"\n\
         otlp_headers = { \"X-Api-Key\" = \"k\" }\n",
    ))
    .unwrap()
    .unwrap();
    assert_eq!(grpc.protocol, OtlpProtocol::Grpc);
    assert_eq!(grpc.signal_url("metrics"), "http://127.0.0.1:4317");
    assert_eq!(grpc.span_delay(), Duration::from_secs(1));
    assert_eq!(grpc.headers["x-api-key"], "k");
    assert_eq!(grpc.service_name, "edge");

    assert_eq!(OtlpSettings::from_settings(&settings("")).unwrap(), None);
}

#[test]
fn bad_values_name_their_key() {
    for (text, field) in [
        ("otlp_endpoint = \"collector:4317\"", "otlp_endpoint"),
        ("otlp_endpoint = \"not a url\"", "otlp_endpoint"),
        ("otlp_endpoint = \"grpc://collector:4317\"", "otlp_endpoint"),
        ("otlp_endpoint = \"https://collector:4317\"", "otlp_endpoint"),
        ("otlp_endpoint = \"http://collector:4317/v1\"", "otlp_endpoint"),
        ("otlp_endpoint = \"http://user:pw@collector:4317\"", "otlp_endpoint"),
        ("otlp_endpoint = \"http://collector:4317\"\notlp_interval = \"10ms\"", "otlp_interval"),
        ("otlp_endpoint = \"http://collector:4317\"\nservice_name = \" \"", "service_name"),
        ("otlp_endpoint = \"http://collector:4317\"\notlp_headers = { \"bad name\" = \"v\" }", "otlp_headers.bad name"),
        ("otlp_endpoint = \"http://collector:4317\"\notlp_headers = { \"k\" = \"line\\nbreak\" }", "otlp_headers.k"),
        ("otlp_protocol = \"grpc\"", "otlp_protocol"),
        ("service_name = \"edge\"", "service_name"),
    ] {
        let err = OtlpSettings::from_settings(&settings(text)).unwrap_err();
        assert_eq!(err.field(), field, "{text}: {err}");
    }
    // https is for HTTP/protobuf.
    assert!(OtlpSettings::from_settings(&settings(
        "otlp_endpoint = \"https://collector:4318\"\notlp_protocol = \"http/protobuf\"",
    ))
    .is_ok());
    assert!(toml::from_str::<ObservabilitySettings>("otlp_protocol = \"http/json\"").is_err());
}

#[test]
fn the_config_file_checks_the_keys_in_their_section() {
    let err = crate::config::Config::from_toml_str(
        "[observability]\notlp_endpoint = \"localhost:4317\"\n",
        std::iter::empty(),
    )
    .unwrap_err();
    assert_eq!(err.key(), Some("observability.otlp_endpoint"), "{err}");
}

#[cfg(feature = "otlp")]
mod recorder {
    use metrics::Recorder as _;
    use opentelemetry::metrics::MeterProvider as _;
    use opentelemetry_sdk::metrics::data::{AggregatedMetrics, MetricData};
    use opentelemetry_sdk::metrics::{InMemoryMetricExporter, PeriodicReader, SdkMeterProvider};

    use crate::otlp::{OtelRecorder, DURATION_BUCKETS};

    #[test]
    fn counters_gauges_and_second_histograms_reach_the_meter() {
        let exporter = InMemoryMetricExporter::default();
        let provider = SdkMeterProvider::builder()
            .with_reader(PeriodicReader::builder(exporter.clone()).build())
            .build();
        let recorder = OtelRecorder::new(provider.meter("test"));
        let metadata = metrics::Metadata::new("t", metrics::Level::INFO, None);
        let labels = vec![metrics::Label::new("gen_ai.tool.name", "search")];
        let key = metrics::Key::from_parts("toolwarden.calls", labels.clone());
        let counter = recorder.register_counter(&key, &metadata);
        counter.increment(2);
        counter.absolute(5);
        counter.absolute(4); // never backwards
        let gauge =
            recorder.register_gauge(&metrics::Key::from_name("toolwarden.in_flight"), &metadata);
        gauge.increment(3.0);
        gauge.decrement(1.0);
        let histogram = recorder.register_histogram(
            &metrics::Key::from_parts("mcp.client.operation.duration", labels),
            &metadata,
        );
        histogram.record(0.25);
        provider.force_flush().unwrap();

        let exported = exporter.get_finished_metrics().unwrap();
        let metrics: Vec<_> = exported
            .iter()
            .flat_map(|r| r.scope_metrics())
            .flat_map(|s| s.metrics())
            .collect();
        let find = |name: &str| metrics.iter().find(|m| m.name() == name).unwrap();
        match find("toolwarden.calls").data() {
            AggregatedMetrics::U64(MetricData::Sum(sum)) => {
                let point = sum.data_points().next().unwrap();
                assert_eq!(point.value(), 5);
                assert_eq!(
                    point.attributes().next().unwrap().key.as_str(),
                    "gen_ai.tool.name"
                );
            }
            other => panic!("{other:?}"),
        }
        match find("toolwarden.in_flight").data() {
            AggregatedMetrics::F64(MetricData::Gauge(gauge)) => {
                assert_eq!(gauge.data_points().next().unwrap().value(), 2.0);
            }
            other => panic!("{other:?}"),
        }
        let duration = find("mcp.client.operation.duration");
        assert_eq!(duration.unit(), "s");
        match duration.data() {
            AggregatedMetrics::F64(MetricData::Histogram(h)) => {
                let point = h.data_points().next().unwrap();
                assert_eq!(point.count(), 1);
                assert_eq!(
                    point.bounds().collect::<Vec<_>>(),
                    DURATION_BUCKETS.to_vec()
                );
            }
            other => panic!("{other:?}"),
        }
    }
}

#[test]
fn the_endpoint_can_come_from_the_environment() {
    let config = crate::config::Config::from_toml_str(
        "",
        [(
            "TOOLWARDEN_OBSERVABILITY_OTLP_ENDPOINT".to_owned(),
            "http://collector:4317".to_owned(),
        )],
    )
    .unwrap();
    assert_eq!(
        config.observability.otlp_endpoint.as_deref(),
        Some("http://collector:4317")
    );
    // The API key stays out of the file.
    let config = crate::config::Config::from_toml_str(
        "[observability]\notlp_endpoint = \"http://collector:4317\"\n",
        [(
            "TOOLWARDEN_OBSERVABILITY_OTLP_HEADERS".to_owned(),
            r#"{ "x-api-key" = "from-env" }"#.to_owned(),
        )],
    )
    .unwrap();
    assert_eq!(config.observability.otlp_headers["x-api-key"], "from-env");
    let err = crate::config::Config::from_toml_str(
        "",
        [(
            "TOOLWARDEN_OBSERVABILITY_OTLP_ENDPOINT".to_owned(),
            "collector".to_owned(),
        )],
    )
    .unwrap_err();
    assert_eq!(err.key(), Some("observability.otlp_endpoint"), "{err}");
}
