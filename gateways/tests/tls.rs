//! HTTPS and MQTTS with rustls: curl and mosquitto_pub trusting a test CA reach Kafka through
//! the TLS ports; a client that does not speak TLS is dropped without harming the others.

mod common;

use common::*;
use ferrule_gateways::GatewayConfig;
use serde_json::json;
use std::process::Command;

#[tokio::test]
async fn https_and_mqtts_reach_kafka() {
    let (dir, tls) = certificates();
    let p = Platform::start_with(GatewayConfig {
        tls,
        ..Default::default()
    })
    .await;
    let tenant = p.tenant(json!({})).await;
    p.device_with_password(&tenant, "dev", json!({})).await;
    let ca = dir.join("ca.pem");
    let (https, mqtts) = (p.https_port.unwrap(), p.mqtts_port.unwrap());

    // A plain-TCP client on the TLS port gets nowhere, and does not disturb the others.
    let mut plain = std::net::TcpStream::connect(("127.0.0.1", https)).unwrap();
    std::io::Write::write_all(&mut plain, b"POST /telemetry HTTP/1.1\r\n\r\n").unwrap();

    let user = format!("dev@{tenant}:pw");
    let url = format!("https://127.0.0.1:{https}/telemetry");
    let ca_arg = ca.to_str().unwrap().to_owned();
    let out = tokio::task::spawn_blocking(move || {
        Command::new("curl")
            .args([
                "-s",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
                "--cacert",
                &ca_arg,
                "-u",
                &user,
            ])
            .args([
                "-H",
                "content-type: text/plain",
                "--data-binary",
                "over https",
                &url,
            ])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "202",
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let (u, ca_arg) = (format!("dev@{tenant}"), ca.to_str().unwrap().to_owned());
    let out = tokio::task::spawn_blocking(move || {
        Command::new("mosquitto_pub")
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &mqtts.to_string(),
                "--cafile",
                &ca_arg,
                "-u",
                &u,
                "-P",
                "pw",
            ])
            .args(["-t", "telemetry", "-m", "over mqtts", "-q", "1"])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The connection attempt names the TLS 1.3 suite mosquitto and rustls agreed on.
    let metrics = prometheus_text();
    let attempt = metrics
        .lines()
        .find(|l| {
            l.starts_with("hono_connections_attempts_total{")
                && l.contains(&format!("tenant=\"{tenant}\""))
        })
        .unwrap_or_else(|| panic!("{metrics}"));
    assert!(attempt.contains("cipher_suite=\"TLS13_"), "{attempt}");

    // Without trusting the CA, curl refuses the server.
    let url = format!("https://127.0.0.1:{https}/telemetry");
    let out = tokio::task::spawn_blocking(move || {
        Command::new("curl")
            .args([
                "-s",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
                "-X",
                "POST",
                &url,
            ])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "000");

    let mut payloads: Vec<Vec<u8>> = read(&format!("hono.telemetry.{tenant}"), 2)
        .await
        .into_iter()
        .map(|r| r.payload)
        .collect();
    payloads.sort();
    assert_eq!(
        payloads,
        vec![b"over https".to_vec(), b"over mqtts".to_vec()]
    );
    drop(plain);
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test]
async fn devices_authenticate_with_client_certificates() {
    let (dir, tls) = certificates();
    let p = Platform::start_with(GatewayConfig {
        tls,
        ..Default::default()
    })
    .await;
    let ca_cn = random_id("device-ca");
    let spki = device_credentials(&dir, "dev", &ca_cn, "device-1");
    // Same CA name, another key: a forgery the gateway must refuse.
    device_credentials(&dir, "forged", &ca_cn, "device-1");
    let tenant = p
        .tenant(json!({"trusted-ca": [{"subject-dn": format!("CN={ca_cn}"), "public-key": spki}]}))
        .await;
    p.device(&tenant, "dev", json!({})).await;
    p.credentials_x509(&tenant, "dev", "CN=device-1").await;
    let (https, mqtts) = (p.https_port.unwrap(), p.mqtts_port.unwrap());
    let path = |f: &str| dir.join(f).to_str().unwrap().to_owned();

    let curl = |cert: &str| {
        let args = vec![
            "-s".to_owned(),
            "-o".into(),
            "/dev/null".into(),
            "-w".into(),
            "%{http_code}".into(),
            "--cacert".into(),
            path("ca.pem"),
            "--cert".into(),
            path(&format!("{cert}.pem")),
            "--key".into(),
            path(&format!("{cert}-key.pem")),
            "-H".into(),
            "content-type: text/plain".into(),
            "--data-binary".into(),
            format!("{cert} over https"),
            format!("https://127.0.0.1:{https}/telemetry"),
        ];
        tokio::task::spawn_blocking(move || Command::new("curl").args(args).output().unwrap())
    };
    let out = curl("dev").await.unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "202",
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = curl("forged").await.unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "401");

    let mosquitto = |cert: &str| {
        let args = vec![
            "-h".to_owned(),
            "127.0.0.1".into(),
            "-p".into(),
            mqtts.to_string(),
            "--cafile".into(),
            path("ca.pem"),
            "--cert".into(),
            path(&format!("{cert}.pem")),
            "--key".into(),
            path(&format!("{cert}-key.pem")),
            "-t".into(),
            "telemetry".into(),
            "-m".into(),
            format!("{cert} over mqtts"),
            "-q".into(),
            "1".into(),
        ];
        tokio::task::spawn_blocking(move || {
            Command::new("mosquitto_pub").args(args).output().unwrap()
        })
    };
    let out = mosquitto("dev").await.unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = mosquitto("forged").await.unwrap();
    assert!(!out.status.success());

    let records = read(&format!("hono.telemetry.{tenant}"), 2).await;
    let mut payloads: Vec<Vec<u8>> = records.iter().map(|r| r.payload.clone()).collect();
    payloads.sort();
    assert_eq!(
        payloads,
        vec![b"dev over https".to_vec(), b"dev over mqtts".to_vec()]
    );
    assert!(records.iter().all(|r| r.headers["device_id"] == "dev"));
    let _ = std::fs::remove_dir_all(dir);
}
