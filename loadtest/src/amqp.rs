//! Applications reading through the AMQP bridge, next to a raw rdkafka consumer reading the
//! same topic: the bridge's delivery rate against the Kafka-leg ceiling.

use fe2o3_amqp::sasl_profile::SaslProfile;
use fe2o3_amqp::types::messaging::Body;
use fe2o3_amqp::types::primitives::Value;
use fe2o3_amqp::{Connection, Receiver, Session};
use rdkafka::ClientConfig;
use rdkafka::consumer::{Consumer, StreamConsumer};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

/// Creates the application `app` of `tenant` with `password` through the registry API.
pub async fn provision_application(
    registry: &str,
    auth: &str,
    tenant: &str,
    app: &str,
    password: &str,
) -> anyhow::Result<()> {
    let (user, pw) = auth.split_once(':').unwrap_or((auth, ""));
    let r = reqwest::Client::new()
        .put(format!("{registry}/v1/applications/{tenant}/{app}"))
        .basic_auth(user, Some(pw))
        .json(&serde_json::json!({"secrets": [{"pwd-plain": password}]}))
        .send()
        .await?;
    anyhow::ensure!(r.status().is_success(), "application: {}", r.status());
    Ok(())
}

/// Reads `total` records of `topic` from the beginning with a fresh group; returns seconds.
pub async fn raw_consume(bootstrap: &str, topic: &str, total: usize) -> anyhow::Result<f64> {
    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set(
            "group.id",
            format!("loadtest-raw-{}", uuid::Uuid::new_v4().simple()),
        )
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .set("log_level", "3")
        .create()?;
    consumer.subscribe(&[topic])?;
    let mut started = None;
    let mut n = 0;
    while n < total {
        consumer.recv().await?;
        started.get_or_insert_with(Instant::now);
        n += 1;
    }
    Ok(started.map(|s| s.elapsed().as_secs_f64()).unwrap_or(0.0))
}

/// `receivers` applications attach to `address` and accept deliveries until `total` arrived
/// between them; returns the seconds from the first delivery to the last.
pub async fn amqp_consume(
    url: &str,
    user: &str,
    password: &str,
    address: &str,
    total: usize,
    receivers: usize,
) -> anyhow::Result<f64> {
    let received = Arc::new(AtomicUsize::new(0));
    let first: Arc<std::sync::OnceLock<Instant>> = Arc::default();
    let mut tasks = Vec::new();
    for i in 0..receivers {
        let (url, user, password, address) = (
            url.to_owned(),
            user.to_owned(),
            password.to_owned(),
            address.to_owned(),
        );
        let (received, first) = (received.clone(), first.clone());
        tasks.push(tokio::spawn(async move {
            let mut connection = Connection::builder()
                .container_id(format!("loadtest-{i}"))
                .sasl_profile(SaslProfile::Plain {
                    username: user,
                    password,
                })
                .open(url.as_str())
                .await?;
            let mut session = Session::begin(&mut connection).await?;
            // An application that keeps up: a window of 1 000 and one disposition per batch
            // of up to 100 deliveries, as a Proton or Vert.x client would.
            let mut receiver = Receiver::builder()
                .name(format!("r{i}"))
                .source(address)
                .credit_mode(fe2o3_amqp::link::receiver::CreditMode::Auto(1000))
                .attach(&mut session)
                .await?;
            let mut pending = Vec::with_capacity(100);
            while received.load(Ordering::Relaxed) < total {
                let wait = if pending.is_empty() { 5000 } else { 2 };
                let recv = tokio::time::timeout(
                    std::time::Duration::from_millis(wait),
                    receiver.recv::<Body<Value>>(),
                )
                .await;
                match recv {
                    Ok(delivery) => {
                        first.get_or_init(Instant::now);
                        pending.push(fe2o3_amqp::link::delivery::DeliveryInfo::from(delivery?));
                        if pending.len() < 100 {
                            continue;
                        }
                    }
                    Err(_) if pending.is_empty() => continue,
                    Err(_) => {}
                }
                let n = pending.len();
                receiver.accept_all(pending.drain(..)).await?;
                received.fetch_add(n, Ordering::Relaxed);
            }
            let _ = receiver.close().await;
            let _ = session.end().await;
            let _ = connection.close().await;
            anyhow::Ok(())
        }));
    }
    let deadline = Instant::now() + std::time::Duration::from_secs(300);
    while received.load(Ordering::Relaxed) < total {
        anyhow::ensure!(
            Instant::now() < deadline,
            "only {} of {total} deliveries arrived",
            received.load(Ordering::Relaxed)
        );
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    let secs = first
        .get()
        .map(|f| f.elapsed().as_secs_f64())
        .unwrap_or(0.0);
    for t in tasks {
        let _ = tokio::time::timeout(std::time::Duration::from_secs(5), t).await;
    }
    Ok(secs)
}

/// Commits offset 0 of every partition of `topic` for `group`, so a bridge link whose consumer
/// group is `group` starts at the beginning: telemetry links otherwise start at the end the log
/// had when they attached, and a rate measured while the records are still being written would
/// measure the writer as well.
pub async fn commit_beginning(bootstrap: &str, group: &str, topic: &str) -> anyhow::Result<()> {
    use rdkafka::consumer::BaseConsumer;
    use rdkafka::{Offset, TopicPartitionList};
    let (bootstrap, group, topic) = (bootstrap.to_owned(), group.to_owned(), topic.to_owned());
    tokio::task::spawn_blocking(move || {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &bootstrap)
            .set("group.id", &group)
            .set("enable.auto.commit", "false")
            .set("log_level", "3")
            .create()?;
        let metadata = consumer.fetch_metadata(Some(&topic), std::time::Duration::from_secs(10))?;
        let mut tpl = TopicPartitionList::new();
        for t in metadata.topics() {
            for p in t.partitions() {
                tpl.add_partition_offset(&topic, p.id(), Offset::Offset(0))?;
            }
        }
        anyhow::ensure!(tpl.count() > 0, "{topic} has no partitions");
        consumer.commit(&tpl, rdkafka::consumer::CommitMode::Sync)?;
        anyhow::Ok(())
    })
    .await?
}

/// `receivers` Qpid Proton-C applications (`loadtest/amqp-proton.c`, built by
/// `scripts/loadtest`) attach to `address` of the bridge at `host_port` and read until `total`
/// messages arrived between them; returns the seconds from the first delivery to the one that
/// made the total, and how many of them came pre-settled.
pub async fn proton_consume(
    program: &str,
    host_port: &str,
    user: &str,
    password: &str,
    address: &str,
    total: usize,
    receivers: usize,
) -> anyhow::Result<(f64, usize)> {
    use tokio::io::AsyncBufReadExt;
    const EVERY: usize = 1000;
    let (tx, mut rx) = tokio::sync::mpsc::channel::<(usize, usize, usize, f64)>(1024);
    let mut children = Vec::new();
    for i in 0..receivers {
        let mut child = tokio::process::Command::new(program)
            .args([
                "receive",
                host_port,
                user,
                password,
                address,
                "0",
                "1000",
                &EVERY.to_string(),
            ])
            .stdout(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()?;
        let stdout = child.stdout.take().expect("piped");
        let tx = tx.clone();
        tokio::spawn(async move {
            let mut lines = tokio::io::BufReader::new(stdout).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) else {
                    continue;
                };
                let field = |k: &str| v.get(k).and_then(serde_json::Value::as_u64);
                if let (Some(n), Some(p), Some(at)) = (
                    field("received"),
                    field("presettled"),
                    v.get("at").and_then(serde_json::Value::as_f64),
                ) && tx.send((i, n as usize, p as usize, at)).await.is_err()
                {
                    break;
                }
            }
        });
        children.push(child);
    }
    drop(tx);
    // The latest count of each receiver and when its latest delivery came; the total is the
    // sum, and it was complete at the latest of those times.
    let mut counts = vec![(0usize, 0usize, 0f64); receivers];
    let mut first = f64::MAX;
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(300);
    loop {
        let Ok(Some((i, n, p, at))) = tokio::time::timeout_at(deadline, rx.recv()).await else {
            let got: usize = counts.iter().map(|c| c.0).sum();
            anyhow::bail!("only {got} of {total} deliveries arrived");
        };
        if n == 1 {
            first = first.min(at);
        }
        counts[i] = (n, p, at);
        if counts.iter().map(|c| c.0).sum::<usize>() >= total {
            for mut c in children {
                let _ = c.kill().await;
            }
            let presettled = counts.iter().map(|c| c.1).sum();
            let last = counts.iter().map(|c| c.2).fold(f64::MIN, f64::max);
            return Ok((last - first, presettled));
        }
    }
}
