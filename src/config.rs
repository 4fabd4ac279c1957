//! The `ferrule` configuration: one TOML file plus `FERRULE_<SECTION>__<KEY>` environment
//! overrides, with defaults that work against the local services `scripts/up` starts.

use anyhow::Context;
use ferrule_gateways::GatewayConfig;
use ferrule_kafka::KafkaConfig;
use ferrule_registry::{DatabaseConfig, RegistryConfig};
use figment::Figment;
use figment::providers::{Env, Format, Serialized, Toml};
use serde::{Deserialize, Serialize};
use std::net::SocketAddr;
use std::path::Path;

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub log: LogConfig,
    pub health: HealthConfig,
    pub shutdown: ShutdownConfig,
    pub database: DatabaseConfig,
    pub kafka: KafkaConfig,
    pub registry: RegistryConfig,
    pub gateway: GatewayConfig,
    pub router: ferrule_command_router::RouterConfig,
    pub bridge: ferrule_stream_bridge::BridgeConfig,
    pub telemetry: ferrule_telemetry::TelemetryConfig,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogConfig {
    /// A `tracing` filter such as `info` or `ferrule_registry=debug,info`; `RUST_LOG` wins.
    pub filter: String,
    /// `text` for people, `json` for log collectors.
    pub format: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            filter: "info".into(),
            format: "text".into(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HealthConfig {
    /// Where `/started`, `/readiness`, `/liveness` and `/metrics` are served.
    pub bind: SocketAddr,
    /// `/liveness` fails once the services' runtime has not run a task for this long
    /// (seconds): every worker is blocked or busy past it.
    pub liveness_stall_secs: u64,
}

impl Default for HealthConfig {
    fn default() -> Self {
        HealthConfig {
            bind: SocketAddr::from(([127, 0, 0, 1], 8088)),
            liveness_stall_secs: 10,
        }
    }
}

/// What happens between SIGTERM (or SIGINT) and the end of the process.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ShutdownConfig {
    /// How long `/readiness` answers 503 while everything still serves, so a load balancer or
    /// Kubernetes stops sending new connections before the listeners close (milliseconds).
    pub readiness_delay_ms: u64,
    /// The most the services then take to drain — answer the messages and events already
    /// handed to Kafka, flush the producer, unregister command consumers, delete the
    /// instance's internal command topic — before the process exits anyway (seconds).
    pub drain_timeout_secs: u64,
}

impl Default for ShutdownConfig {
    fn default() -> Self {
        ShutdownConfig {
            readiness_delay_ms: 2000,
            drain_timeout_secs: 20,
        }
    }
}

/// Environment variables that configure `ferrule`: `FERRULE_` + section + `__` + key.
pub const ENV_PREFIX: &str = "FERRULE_";

impl Config {
    /// Defaults, then the file (if any), then the environment.
    pub fn load(file: Option<&Path>) -> anyhow::Result<Config> {
        let mut fig = Figment::from(Serialized::defaults(Config::default()));
        if let Some(path) = file {
            if !path.exists() {
                anyhow::bail!("config file {} does not exist", path.display());
            }
            fig = fig.merge(Toml::file(path));
        }
        fig = fig.merge(
            Env::prefixed(ENV_PREFIX)
                .filter(|k| k.as_str().contains("__"))
                .split("__"),
        );
        fig.extract().context("invalid configuration")
    }

    /// The defaults as TOML, which is also the reference of every key.
    pub fn defaults_toml() -> String {
        toml::to_string_pretty(&Config::default())
            .unwrap_or_else(|e| format!("# cannot render defaults: {e}\n"))
    }
}

/// Every key as `section.key = default`, one per line, for `--help`.
pub fn key_reference() -> String {
    let value = toml::Value::try_from(Config::default()).unwrap_or(toml::Value::Boolean(false));
    let mut lines = Vec::new();
    flatten("", &value, &mut lines);
    lines.join("\n")
}

fn flatten(prefix: &str, v: &toml::Value, out: &mut Vec<String>) {
    match v {
        // A table of free-form keys (`kafka.properties`) is listed as a key of its own.
        toml::Value::Table(t) if t.is_empty() && !prefix.is_empty() => {
            let env = format!(
                "{ENV_PREFIX}{}__<KEY>",
                prefix.replace('.', "__").to_uppercase()
            );
            out.push(format!("  {prefix} = {{}}   [{env}]"));
        }
        toml::Value::Table(t) => {
            for (k, v) in t {
                let key = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                flatten(&key, v, out);
            }
        }
        other => {
            let env = format!("{ENV_PREFIX}{}", prefix.replace('.', "__").to_uppercase());
            out.push(format!("  {prefix} = {other}   [{env}]"));
        }
    }
}

#[cfg(test)]
// figment's test jail returns its own (large) error type.
#[allow(clippy::result_large_err)]
mod tests {
    use super::*;

    #[test]
    fn file_then_environment() {
        figment::Jail::expect_with(|jail| {
            jail.create_file(
                "f.toml",
                "[registry]\nbind = \"127.0.0.1:1\"\n[database]\nurl = \"postgres://x@h/db\"\n",
            )?;
            jail.set_env("FERRULE_REGISTRY__MAX_PAYLOAD_SIZE", "42");
            jail.set_env("FERRULE_DATABASE__URL", "postgres://y@h/db");
            jail.set_env("FERRULE_DATABASE__TLS", "verify-full");
            jail.set_env("FERRULE_DATABASE__CA_FILE", "/etc/ferrule/pg-ca.pem");
            jail.set_env("FERRULE_HOME", "ignored: not a config key");
            let c = Config::load(Some(Path::new("f.toml"))).map_err(|e| e.to_string())?;
            assert_eq!(c.registry.bind.port(), 1);
            assert_eq!(c.registry.max_payload_size, 42);
            assert_eq!(c.database.url, "postgres://y@h/db");
            assert_eq!(c.database.tls, ferrule_registry::DatabaseTls::VerifyFull);
            assert_eq!(c.database.ca_file, Path::new("/etc/ferrule/pg-ca.pem"));
            assert_eq!(c.health.bind.port(), 8088);
            Ok(())
        });
    }

    #[test]
    fn kafka_settings_and_properties_come_from_file_and_environment() {
        figment::Jail::expect_with(|jail| {
            jail.create_file(
                "f.toml",
                "[kafka]\nsecurity_protocol = \"sasl_ssl\"\nsasl_mechanism = \"SCRAM-SHA-256\"\n\
                 [kafka.producer.properties]\n\"compression.type\" = \"zstd\"\n\"batch.size\" = 65536\n",
            )?;
            jail.set_env("FERRULE_KAFKA__SASL_USERNAME", "alice");
            jail.set_env("FERRULE_KAFKA__PROPERTIES__SOCKET_KEEPALIVE_ENABLE", "true");
            let c = Config::load(Some(Path::new("f.toml"))).map_err(|e| e.to_string())?;
            assert_eq!(
                c.kafka.security_protocol,
                ferrule_kafka::SecurityProtocol::SaslSsl
            );
            assert_eq!(
                c.kafka.sasl_mechanism,
                ferrule_kafka::SaslMechanism::ScramSha256
            );
            let p = c.kafka.producer().into_config();
            assert_eq!(p.get("sasl.username"), Some("alice"));
            assert_eq!(p.get("compression.type"), Some("zstd"));
            assert_eq!(p.get("batch.size"), Some("65536"));
            assert_eq!(p.get("socket.keepalive.enable"), Some("true"));
            assert_eq!(
                c.kafka.consumer().into_config().get("compression.type"),
                None
            );
            Ok(())
        });
    }

    #[test]
    fn unknown_keys_are_refused() {
        figment::Jail::expect_with(|jail| {
            jail.create_file("f.toml", "[registry]\nbindd = \"127.0.0.1:1\"\n")?;
            assert!(Config::load(Some(Path::new("f.toml"))).is_err());
            assert!(Config::load(Some(Path::new("missing.toml"))).is_err());
            Ok(())
        });
    }

    #[test]
    fn reference_lists_keys_with_env_names() {
        let r = key_reference();
        assert!(
            r.contains("registry.bind = \"127.0.0.1:28080\"   [FERRULE_REGISTRY__BIND]"),
            "{r}"
        );
        assert!(r.contains("kafka.bootstrap_servers"), "{r}");
        assert!(
            r.contains("database.tls = \"prefer\"   [FERRULE_DATABASE__TLS]"),
            "{r}"
        );
        assert!(r.contains("database.ca_file = \"\""), "{r}");
        assert!(Config::defaults_toml().contains("[registry.management]"));
    }
}
