//! Alerts like ASR's (issue 4): an appliance's cache free below 30% and 20%, an upload backlog
//! over 30 minutes, and an appliance that stops reporting are raised and cleared in the API,
//! the metrics and `ferry ctl alerts`; only the appliance itself may report.

#[path = "support/config_server.rs"]
mod harness;

use ferry_api::{Event, Severity};
use ferry_config_server::client::{Client, Method};
use harness::*;
use serde_json::{json, Value};
use std::process::Command;
use std::time::{Duration, Instant};

async fn alerts(c: &Client) -> Vec<Event> {
    c.get("/v1/alerts").await.unwrap()
}

fn find<'a>(v: &'a [Event], subject: &str) -> Option<&'a Event> {
    v.iter().find(|e| e.subject == subject)
}

#[test]
fn appliance_alerts_are_raised_and_cleared() {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start_with(
        &dir.path().join("state"),
        &["--unreachable-secs".into(), "2".into()],
    );
    run(async {
        let admin = s.admin();
        inventory(&admin).await;
        let t: Value = ok(
            &admin,
            Method::POST,
            "/v1/tokens",
            Some(json!({"name": "ps1", "role": "operator", "tenant": "acme",
                        "appliance": "process-server", "ttl_secs": 60})),
        )
        .await;
        let ps1 = enroll(&s, t["token"].as_str().unwrap(), &dir.path().join("ps1")).await;
        let viewer_tok = token(&admin, "vera", "viewer", Some("acme"), 60).await;
        let viewer = enroll(&s, &viewer_tok.token, &dir.path().join("vera")).await;
        let report = "/v1/appliances/ps1/report";
        let cache = "appliances/ps1/cache";
        let backlog = "appliances/ps1/backlog";

        let put = |c: &Client, body: Value| {
            let c = c.clone();
            async move { call(&c, Method::PUT, report, Some(body)).await }
        };
        put(
            &ps1,
            json!({"cache_free_ratio": 0.25, "upload_backlog_secs": 10.0}),
        )
        .await
        .unwrap();
        let a = alerts(&viewer).await;
        let e = find(&a, cache).expect("a cache alert");
        assert_eq!(e.severity, Severity::Warning);
        assert!(e.message.contains("below 30%"), "{e:?}");
        assert!(find(&a, backlog).is_none());

        put(
            &ps1,
            json!({"cache_free_ratio": 0.1, "upload_backlog_secs": 2400.0}),
        )
        .await
        .unwrap();
        let a = alerts(&viewer).await;
        assert_eq!(find(&a, cache).unwrap().severity, Severity::Critical);
        assert!(find(&a, backlog).unwrap().message.contains("40 min"));
        let (_, m) = viewer.raw(Method::GET, "/metrics", None).await.unwrap();
        let m = String::from_utf8_lossy(&m);
        assert!(
            m.contains(&format!(
                "ferry_alert_active{{tenant=\"acme\",subject=\"{cache}\",severity=\"critical\"}} 1"
            )),
            "{m}"
        );

        // People may not report for an appliance, nor an appliance for another; bad values are
        // refused. Nothing changes.
        for (c, body, status) in [
            (&viewer, json!({"cache_free_ratio": 0.9}), 403),
            (&ps1, json!({"cache_free_ratio": 1.5}), 422),
            (&ps1, json!({"cache_free_ratio": "lots"}), 422),
        ] {
            let (st, _, _) = refused(c, Method::PUT, report, Some(body)).await;
            assert_eq!(st, status);
        }
        let (st, _, _) = refused(
            &ps1,
            Method::PUT,
            "/v1/appliances/ps2/report",
            Some(json!({})),
        )
        .await;
        assert_eq!(st, 403);
        assert_eq!(
            find(&alerts(&viewer).await, cache).unwrap().severity,
            Severity::Critical
        );

        put(
            &ps1,
            json!({"cache_free_ratio": 0.5, "upload_backlog_secs": 1.0}),
        )
        .await
        .unwrap();
        let a = alerts(&viewer).await;
        assert!(
            find(&a, cache).is_none() && find(&a, backlog).is_none(),
            "{a:?}"
        );
        let events: Vec<Event> = viewer.get("/v1/events?limit=1000").await.unwrap();
        assert!(events
            .iter()
            .any(|e| e.subject == cache && !e.active && e.message.starts_with("cleared")));

        // Silent for longer than --unreachable-secs: unreachable, until it reports again.
        let reachable = "appliances/ps1/reachable";
        let began = Instant::now();
        let raised = loop {
            if let Some(e) = find(&alerts(&admin).await, reachable) {
                break e.clone();
            }
            assert!(
                began.elapsed() < Duration::from_secs(20),
                "no unreachable alert"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        assert_eq!(raised.severity, Severity::Critical);
        assert!(raised.message.contains("has not reported"), "{raised:?}");
        // The CLI shows it.
        let out = Command::new(exe())
            .args(["ctl", "--server", &s.url, "--cert-dir"])
            .arg(s.state.join("admin"))
            .args(["alerts"])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success() && text.contains(reachable), "{text}");
        put(&ps1, json!({})).await.unwrap();
        assert!(find(&alerts(&admin).await, reachable).is_none());
    });
}
