//! The configuration file: its TOML format, its defaults, and its validation
//! into the runtime [`Settings`] that the rest of the program trusts.
//!
//! The raw structs mirror the file one to one (`deny_unknown_fields`
//! everywhere, so a typo is an error, not a silently ignored key). Every value
//! is checked once, here, and any problem is reported with the key path and
//! the reason before a single event is read.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::config_blocks::{check, InvalidSetting, OptionValue};
use crate::config_secrets::{expand_table, Sources};
use crate::kafka::settings::{is_secret_option, KafkaSettings, RawKafka, MASK};
use crate::model::file::{
    build_model, effective_model, ModelSections, RawInput, RawScoring, RawSignals, RawTier,
};
use crate::model::{Clock, Model};
use crate::snapshot::settings::{build_snapshot, RawSnapshot, SnapshotSettings};

/// Why a configuration file was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The file is not valid TOML, or a key is unknown or of the wrong type.
    #[error("invalid config file {path}: {key}: {message}")]
    Syntax {
        path: PathBuf,
        key: String,
        message: String,
    },
    /// A value is well-formed but not acceptable.
    #[error("invalid config file {path}: {key}: {reason}")]
    Invalid {
        path: PathBuf,
        key: String,
        reason: String,
    },
}

/// The built-in model, `config/default.toml`: a configuration without a
/// `[scoring]` section takes its model sections from it, so that a service
/// configured by `CES_*` variables alone has a model.
pub const BUILT_IN: &str = include_str!("../config/default.toml");

/// The sections that make up the model.
const MODEL_SECTIONS: [&str; 4] = ["scoring", "tiers", "signals", "input"];

/// The whole file. Only `[scoring.activities]` is required.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    pub scoring: RawScoring,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tiers: Option<Vec<RawTier>>,
    #[serde(default)]
    pub signals: RawSignals,
    #[serde(default)]
    pub input: RawInput,
    /// Only `run` needs it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kafka: Option<RawKafka>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot: Option<RawSnapshot>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http: Option<RawHttp>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics: Option<RawMetrics>,
}

/// `[http]`: metrics, health and the customer API of `run`.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawHttp {
    /// Default `0.0.0.0:9464`. Env: `CES_HTTP_LISTEN`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub listen: Option<String>,
    /// The environment variable holding the bearer token `/v1/*` requires
    /// (and member claims are signed with); unset, and no
    /// `api_token_file`: `/v1/*` is open.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_token_env: Option<String>,
    /// Or the file holding it (a mounted secret; one trailing newline is
    /// dropped), read at start.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_token_file: Option<PathBuf>,
    /// The address the other instances of the group reach this one's API
    /// at, to forward requests for the customers it owns. Default:
    /// `http://<host>:<port>`, the host being the listen address when it is
    /// a specific one, else this machine's host name (a pod's name); the
    /// port the one listened on. Env: `CES_HTTP_ADVERTISED_URL`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub advertised_url: Option<String>,
    /// PEM file of the certificate authorities that sign the other
    /// instances' certificates, when their advertised URLs are `https://`:
    /// forwarded requests trust these only. Unset: the system's trust
    /// store. There is no way to skip the verification.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub forward_ca_file: Option<PathBuf>,
}

/// `[metrics]`.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawMetrics {
    /// `attributes.segment` values counted per tier (at most 127).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub segments: Vec<String>,
}

/// `[http]` and `[metrics]`, validated.
#[derive(Debug, Clone, PartialEq)]
pub struct HttpSettings {
    pub listen: std::net::SocketAddr,
    pub api_token_env: Option<String>,
    /// At most one of `api_token_env` and this.
    pub api_token_file: Option<PathBuf>,
    /// Checked: `http://` or `https://`, a host, no path, query or user.
    pub advertised_url: Option<String>,
    pub segments: Vec<String>,
    /// `forward_ca_file` and its contents, read and checked once.
    pub forward_ca: Option<(PathBuf, Vec<u8>)>,
}

/// The validated configuration.
#[derive(Debug, Clone)]
pub struct Settings {
    pub model: Model,
    /// The live clock of `run`.
    pub clock: Clock,
    /// `None` without a `[kafka]` section (enough for `replay`).
    pub kafka: Option<KafkaSettings>,
    pub snapshot: SnapshotSettings,
    pub http: HttpSettings,
    /// The file had no `[scoring]`: the model is the built-in one (its
    /// `[tiers]`, `[signals]` and `[input]` too, where the file has none).
    pub built_in_model: bool,
}

/// Sets one `[kafka]` key from its environment variable's value.
type SetKafka = fn(&mut RawKafka, String);

/// The environment variables that override `[kafka]` keys, each with the
/// key it sets (a table of setters: a variable cannot reach another key).
pub const KAFKA_ENV: [(&str, SetKafka); 7] = [
    ("CES_KAFKA_BROKERS", |k, v| k.brokers = Some(v)),
    ("CES_KAFKA_GROUP_ID", |k, v| k.group_id = Some(v)),
    ("CES_KAFKA_INPUT_TOPICS", |k, v| {
        k.input_topics = Some(
            v.split(',')
                .map(str::trim)
                .filter(|t| !t.is_empty())
                .map(String::from)
                .collect(),
        )
    }),
    ("CES_KAFKA_OUTPUT_TOPIC", |k, v| k.output_topic = Some(v)),
    ("CES_KAFKA_DEAD_LETTER_TOPIC", |k, v| {
        k.dead_letter_topic = Some(v)
    }),
    ("CES_KAFKA_GUARANTEE", |k, v| k.guarantee = Some(v)),
    ("CES_KAFKA_INSTANCE_ID", |k, v| k.instance_id = Some(v)),
];

impl Settings {
    /// Reads, parses and validates a configuration file, with the
    /// `CES_KAFKA_*` environment variables overriding `[kafka]` keys.
    pub fn load(path: &Path) -> Result<Settings, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Settings::from_toml_with_env(&text, path, |k| std::env::var(k).ok())
    }

    /// As [`Settings::load`] without a file: the built-in model, the rest
    /// from the `CES_*` environment variables.
    pub fn load_built_in() -> Result<Settings, ConfigError> {
        Settings::from_toml_with_env(BUILT_IN, Path::new("(built-in default)"), |k| {
            std::env::var(k).ok()
        })
        .map(|mut s| {
            s.built_in_model = true;
            s
        })
    }

    /// Parses and validates configuration text; `path` only names it in errors.
    pub fn from_toml(text: &str, path: &Path) -> Result<Settings, ConfigError> {
        Settings::from_toml_with_env(text, path, |_| None)
    }

    /// As [`Settings::from_toml`], with `env` looking up the overrides.
    pub fn from_toml_with_env(
        text: &str,
        path: &Path,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Settings, ConfigError> {
        let read_file = |p: &Path| std::fs::read_to_string(p);
        let sources = Sources {
            env: &env,
            read_file: &read_file,
        };
        let (mut raw, built_in_model) = parse_raw(text, path, &sources)?;
        apply_env(&mut raw, &env);
        let invalid = |e: InvalidSetting| ConfigError::Invalid {
            path: path.to_path_buf(),
            key: e.key,
            reason: e.reason,
        };
        let model = build_model(ModelSections {
            scoring: &raw.scoring,
            tiers: raw.tiers.as_deref(),
            signals: &raw.signals,
            input: &raw.input,
        })
        .map_err(invalid)?;
        let kafka = raw
            .kafka
            .as_ref()
            .map(KafkaSettings::from_raw)
            .transpose()
            .map_err(invalid)?;
        let snapshot = build_snapshot(raw.snapshot.as_ref()).map_err(invalid)?;
        let http = build_http(raw.http.as_ref(), raw.metrics.as_ref()).map_err(invalid)?;
        Ok(Settings {
            model,
            clock: raw.input.clock.unwrap_or_default(),
            kafka,
            snapshot,
            http,
            built_in_model,
        })
    }

    /// The `[kafka]` settings, or why `run` cannot start without them.
    pub fn kafka(&self) -> Result<&KafkaSettings, ConfigError> {
        self.kafka.as_ref().ok_or_else(|| ConfigError::Invalid {
            path: PathBuf::from("(config)"),
            key: "kafka".into(),
            reason: "a [kafka] section (or CES_KAFKA_* variables) is required to run against Kafka"
                .into(),
        })
    }

    /// The configuration as it is in effect, every default filled in, as
    /// TOML that loads back to the same settings, except that secret
    /// values (passwords, SASL and OAuth secrets, inline private keys) are
    /// masked: this is what `check-config` shows.
    pub fn effective_toml(&self) -> String {
        let raw = effective_raw(self);
        toml::to_string(&raw).unwrap_or_else(|e| format!("# cannot render: {e}\n"))
    }
}

fn build_http(
    http: Option<&RawHttp>,
    metrics: Option<&RawMetrics>,
) -> Result<HttpSettings, InvalidSetting> {
    let http = http.cloned().unwrap_or_default();
    let listen_text = http.listen.unwrap_or_else(|| "0.0.0.0:9464".into());
    let listen = listen_text.parse().map_err(|e| InvalidSetting {
        key: "http.listen".into(),
        reason: format!("\"{listen_text}\" is not an address:port: {e}"),
    })?;
    if let Some(var) = &http.api_token_env {
        check("http.api_token_env", !var.is_empty(), "cannot be empty")?;
    }
    check(
        "http.api_token_file",
        http.api_token_env.is_none() || http.api_token_file.is_none(),
        "set api_token_env or api_token_file, not both",
    )?;
    let advertised_url = http
        .advertised_url
        .as_deref()
        .map(|u| {
            advertised(u).map_err(|reason| InvalidSetting {
                key: "http.advertised_url".into(),
                reason: format!("\"{u}\" {reason}"),
            })
        })
        .transpose()?;
    let forward_ca = http
        .forward_ca_file
        .as_ref()
        .map(|path| {
            let invalid = |reason: String| InvalidSetting {
                key: "http.forward_ca_file".into(),
                reason: format!("{}: {reason}", path.display()),
            };
            let pem = std::fs::read(path).map_err(|e| invalid(format!("cannot read it: {e}")))?;
            match reqwest::Certificate::from_pem_bundle(&pem) {
                Ok(certificates) if !certificates.is_empty() => Ok((path.clone(), pem)),
                Ok(_) => Err(invalid("holds no PEM certificate".into())),
                Err(e) => Err(invalid(format!("is not a PEM certificate bundle: {e}"))),
            }
        })
        .transpose()?;
    let segments = metrics.map(|m| m.segments.clone()).unwrap_or_default();
    check(
        "metrics.segments",
        segments.len() <= 127,
        "at most 127 segments",
    )?;
    for (i, s) in segments.iter().enumerate() {
        check(
            &format!("metrics.segments[{i}]"),
            !s.is_empty(),
            "cannot be empty",
        )?;
    }
    Ok(HttpSettings {
        listen,
        api_token_env: http.api_token_env,
        api_token_file: http.api_token_file,
        advertised_url,
        segments,
        forward_ca,
    })
}

/// An advertised URL as the other instances will use it: a base to which
/// `/v1/...` is appended, so without a trailing slash.
fn advertised(text: &str) -> Result<String, String> {
    let url = reqwest::Url::parse(text).map_err(|e| format!("is not a URL: {e}"))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err("must start with http:// or https://".into());
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err("has no host".into());
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err("cannot carry a user or password".into());
    }
    if url.query().is_some() || url.fragment().is_some() || url.path() != "/" {
        return Err("must be scheme://host[:port], without a path or query".into());
    }
    Ok(url.as_str().trim_end_matches('/').to_string())
}

/// Applies the `CES_KAFKA_*` overrides; any of them creates `[kafka]`.
fn apply_env(raw: &mut RawConfig, env: &impl Fn(&str) -> Option<String>) {
    if let Some(listen) = env("CES_HTTP_LISTEN") {
        raw.http.get_or_insert_with(RawHttp::default).listen = Some(listen);
    }
    if let Some(url) = env("CES_HTTP_ADVERTISED_URL") {
        raw.http.get_or_insert_with(RawHttp::default).advertised_url = Some(url);
    }
    if let Some(dir) = env("CES_SNAPSHOT_DIR") {
        raw.snapshot.get_or_insert_with(RawSnapshot::default).dir = Some(PathBuf::from(dir));
    }
    for (var, set) in KAFKA_ENV {
        if let Some(value) = env(var) {
            set(raw.kafka.get_or_insert_with(RawKafka::default), value);
        }
    }
}

/// Parses the file and expands its `${...}` references; without
/// `[scoring]`, the model sections it lacks come from [`BUILT_IN`] (then
/// the second value is true).
fn parse_raw(
    text: &str,
    path: &Path,
    sources: &Sources<'_>,
) -> Result<(RawConfig, bool), ConfigError> {
    let syntax = |key: String, mut e: toml::de::Error| {
        e.set_input(Some(text));
        ConfigError::Syntax {
            path: path.to_path_buf(),
            key: if key.is_empty() || key == "." {
                "(file)".into()
            } else {
                key
            },
            message: e.to_string().trim_end().to_string(),
        }
    };
    let mut table: toml::Table = text.parse().map_err(|e| syntax(String::new(), e))?;
    let expanded = expand_table(&mut table, sources).map_err(|e| ConfigError::Invalid {
        path: path.to_path_buf(),
        key: e.key,
        reason: e.reason,
    })?;
    let built_in_model = !table.contains_key("scoring");
    if built_in_model {
        let built_in: toml::Table = BUILT_IN.parse().map_err(|e| syntax(String::new(), e))?;
        for (key, value) in built_in {
            if MODEL_SECTIONS.contains(&key.as_str()) && !table.contains_key(&key) {
                table.insert(key, value);
            }
        }
    }
    if expanded || built_in_model {
        let raw = serde_path_to_error::deserialize(toml::Value::Table(table)).map_err(|e| {
            let key = e.path().to_string();
            syntax(key, e.into_inner())
        })?;
        return Ok((raw, built_in_model));
    }
    // Deserialized from the text again, not from the table: errors then
    // point at a line.
    let de = toml::de::Deserializer::parse(text).map_err(|e| syntax(String::new(), e))?;
    let raw = serde_path_to_error::deserialize(de).map_err(|e| {
        let key = e.path().to_string();
        syntax(key, e.into_inner())
    })?;
    Ok((raw, false))
}

/// The raw form of the settings with every default written out.
fn effective_raw(settings: &Settings) -> RawConfig {
    let model = effective_model(&settings.model);
    let mut raw = RawConfig {
        scoring: model.scoring,
        tiers: model.tiers,
        signals: model.signals,
        input: model.input,
        ..RawConfig::default()
    };
    raw.input.clock = Some(settings.clock);
    let s = &settings.snapshot;
    raw.http = Some(RawHttp {
        listen: Some(settings.http.listen.to_string()),
        api_token_env: settings.http.api_token_env.clone(),
        api_token_file: settings.http.api_token_file.clone(),
        advertised_url: settings.http.advertised_url.clone(),
        forward_ca_file: settings
            .http
            .forward_ca
            .as_ref()
            .map(|(path, _)| path.clone()),
    });
    if !settings.http.segments.is_empty() {
        raw.metrics = Some(RawMetrics {
            segments: settings.http.segments.clone(),
        });
    }
    raw.snapshot = Some(s.to_raw());
    raw.kafka = settings.kafka.as_ref().map(KafkaSettings::to_raw);
    if let Some(kafka) = &mut raw.kafka {
        for options in [
            &mut kafka.options,
            &mut kafka.consumer_options,
            &mut kafka.producer_options,
        ] {
            for (name, value) in options.iter_mut() {
                if is_secret_option(name) {
                    *value = OptionValue::Text(MASK.into());
                }
            }
        }
    }
    raw
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Diversity, InputFormat, Normalization};

    fn load(text: &str) -> Result<Settings, ConfigError> {
        Settings::from_toml(text, Path::new("test.toml"))
    }

    fn err(text: &str) -> String {
        match load(text) {
            Ok(_) => panic!("config was accepted:\n{text}"),
            Err(e) => e.to_string(),
        }
    }

    const MINIMAL: &str = "[scoring.activities]\npage_view = { weight = 1.0 }\n";

    #[test]
    fn minimal_file_gets_spec_defaults() {
        let m = load(MINIMAL).unwrap().model;
        assert_eq!(m.half_life, 14 * 86_400_000);
        assert_eq!(
            m.normalization,
            Normalization::Saturating {
                half_score_at: 40.0
            }
        );
        assert_eq!(m.diversity, None);
        let names: Vec<_> = m.tiers.iter().map(|t| &*t.name).collect();
        assert_eq!(
            names,
            ["very_disengaged", "somewhat_engaged", "very_engaged"]
        );
        assert_eq!(m.signals.sweep_interval, 3_600_000);
        assert_eq!(m.signals.min_delta, 5.0);
        assert_eq!(m.signals.churn.lookback, 30 * 86_400_000);
        assert_eq!(m.signals.churn.min_peak, 40.0);
        assert_eq!(m.signals.churn.drop_ratio, 0.4);
        assert_eq!(m.signals.churn.inactivity, 14 * 86_400_000);
        assert_eq!(m.input.format, InputFormat::Auto);
        assert_eq!(m.input.max_event_bytes, 65_536);
        assert_eq!(m.input.max_future_skew, 300_000);
        assert_eq!(m.input.max_lateness, 30 * 86_400_000);
        assert_eq!(m.input.dedup_depth, 4);
        assert_eq!(m.signals.tier_hysteresis, 0.0);
        assert_eq!(m.forget_after, None);
        assert_eq!(&*m.channels[0], "default");
        assert_eq!(m.activities[0].value_weight, 0.0);
        assert_eq!(m.activities[0].cap, None);
    }

    #[test]
    fn diversity_section_defaults_to_the_spec_example() {
        let m = load(&format!("{MINIMAL}[scoring.diversity]\n"))
            .unwrap()
            .model;
        assert_eq!(
            m.diversity,
            Some(Diversity {
                window: 30 * 86_400_000,
                bonus_per_channel: 0.1,
                max_channels: 4
            })
        );
    }

    #[test]
    fn unknown_keys_name_their_path() {
        let e = err("[scoring.activities]\npage_view = { wieght = 1.0 }\n");
        assert!(
            e.contains("scoring.activities.page_view") && e.contains("unknown field `wieght`"),
            "{e}"
        );
        let e = err(&format!("{MINIMAL}[signals]\nmin_detla = 3\n"));
        assert!(e.contains("signals") && e.contains("min_detla"), "{e}");
        let e = err(&format!("{MINIMAL}[surprise]\n"));
        assert!(e.contains("unknown field `surprise`"), "{e}");
    }

    #[test]
    fn activities_are_required() {
        let e = err("[scoring]\nhalf_life = \"14d\"\n");
        assert!(e.contains("activities"), "{e}");
        let e = err("[scoring.activities]\n");
        assert!(e.contains("at least one activity"), "{e}");
    }

    #[test]
    fn bad_values_fail_with_key_and_reason() {
        let cases = [
            (
                "[scoring]\nhalf_life = \"-14d\"\n",
                "scoring.half_life",
                "negative",
            ),
            (
                "[scoring]\nhalf_life = \"0s\"\n",
                "scoring.half_life",
                "must be positive",
            ),
            (
                "[scoring]\nhalf_life = \"14 fortnights\"\n",
                "scoring.half_life",
                "invalid duration",
            ),
            (
                "[scoring.normalization]\nkind = \"cubic\"\n",
                "scoring.normalization.kind",
                "unknown variant `cubic`",
            ),
            (
                "[scoring.normalization]\nhalf_score_at = 0\n",
                "scoring.normalization.half_score_at",
                "must be > 0",
            ),
            (
                "[scoring.normalization]\nkind = \"linear\"\nmax = -1\n",
                "scoring.normalization.max",
                "must be > 0",
            ),
            (
                "[scoring.normalization]\nkind = \"linear\"\nhalf_score_at = 3\n",
                "scoring.normalization.half_score_at",
                "only applies",
            ),
            ("[signals]\nmin_delta = -1\n", "signals.min_delta", ">= 0"),
            (
                "[signals]\nsweep_interval = \"0s\"\n",
                "signals.sweep_interval",
                "positive",
            ),
            (
                "[signals.churn]\ndrop_ratio = 1.5\n",
                "signals.churn.drop_ratio",
                "(0, 1]",
            ),
            (
                "[input]\nmax_event_bytes = 0\n",
                "input.max_event_bytes",
                "positive",
            ),
            (
                "[input]\nformat = \"xml\"\n",
                "input.format",
                "unknown variant",
            ),
            (
                "[input.segment_events]\n\"Order Completed\" = \"purchase\"\n",
                "input.segment_events.\"Order Completed\"",
                "not in [scoring.activities]",
            ),
            (
                "[input]\ndedup_depth = -1\n",
                "input.dedup_depth",
                "between 0 and 64",
            ),
            (
                "[input]\ndedup_depth = 65\n",
                "input.dedup_depth",
                "between 0 and 64",
            ),
            (
                "[signals]\ntier_hysteresis = -0.5\n",
                "signals.tier_hysteresis",
                "[0, 100)",
            ),
            (
                "[signals]\ntier_hysteresis = \"2\"\n",
                "signals.tier_hysteresis",
                "invalid type",
            ),
            (
                "[scoring]\nforget_after = \"0s\"\n",
                "scoring.forget_after",
                "must be positive",
            ),
            (
                "[scoring]\nforget_after = \"a year\"\n",
                "scoring.forget_after",
                "invalid duration",
            ),
            (
                "[scoring.diversity]\nmax_channels = 0\n",
                "scoring.diversity.max_channels",
                "between 1 and 255",
            ),
        ];
        for (extra, key, reason) in cases {
            // Put the extra sections around the required activities table.
            let text = if extra.starts_with("[scoring]") {
                format!("{extra}{MINIMAL}")
            } else {
                format!("{MINIMAL}{extra}")
            };
            let e = err(&text);
            assert!(e.contains(key) && e.contains(reason), "{text}\n=> {e}");
        }
    }

    #[test]
    fn caps_must_be_positive() {
        for cap in ["0", "-3.5"] {
            let e = err(&format!(
                "[scoring.activities]\npage_view = {{ weight = 1.0, cap = {cap} }}\n"
            ));
            assert!(
                e.contains("scoring.activities.page_view.cap") && e.contains("must be > 0"),
                "{e}"
            );
        }
    }

    #[test]
    fn tiers_are_checked() {
        let e = err(&format!(
            "{MINIMAL}[[tiers]]\nname = \"low\"\n[[tiers]]\nname = \"high\"\nabove = 70\n[[tiers]]\nname = \"mid\"\nabove = 40\n"
        ));
        assert!(
            e.contains("tiers[2].above") && e.contains("out of order"),
            "{e}"
        );
        let e = err(&format!("{MINIMAL}[[tiers]]\nname = \"low\"\nabove = 10\n"));
        assert!(
            e.contains("tiers[0].above") && e.contains("lowest tier"),
            "{e}"
        );
        let e = err(&format!(
            "{MINIMAL}[[tiers]]\nname = \"low\"\n[[tiers]]\nname = \"x\"\n"
        ));
        assert!(
            e.contains("tiers[1].above") && e.contains("required"),
            "{e}"
        );
        let e = err(&format!(
            "{MINIMAL}[[tiers]]\nname = \"a\"\n[[tiers]]\nname = \"a\"\nabove = 5\n"
        ));
        assert!(e.contains("duplicate tier name"), "{e}");
    }

    #[test]
    fn without_scoring_the_built_in_model_is_used() {
        let built_in = load(BUILT_IN).unwrap();
        assert!(!built_in.built_in_model, "the file itself has [scoring]");
        // Only [kafka]: every model section is the built-in one.
        let s = load("[kafka]\nbrokers = \"b:9092\"\ninput_topics = [\"in\"]\n").unwrap();
        assert!(s.built_in_model);
        assert_eq!(s.model.activities, built_in.model.activities);
        assert_eq!(s.model.tiers, built_in.model.tiers);
        assert_eq!(s.model.signals, built_in.model.signals);
        // A model section the file has is the file's.
        let s = load("[signals]\nmin_delta = 7.0\n").unwrap();
        assert!(s.built_in_model);
        assert_eq!(s.model.signals.min_delta, 7.0);
        assert_eq!(s.model.activities, built_in.model.activities);
        // An empty file, or CES_* variables alone.
        let s = Settings::from_toml_with_env("", Path::new("t"), |k| {
            (k == "CES_KAFKA_INPUT_TOPICS").then(|| "in".to_string())
        })
        .unwrap();
        assert!(s.built_in_model && s.kafka.is_some());
        // Errors in the rest of the file still name their key.
        let e = err("[kafka]\nbrokers = 5\n");
        assert!(e.contains("kafka.brokers"), "{e}");
    }

    #[test]
    fn advertised_urls_are_checked() {
        let url = |u: &str| {
            load(&format!("{MINIMAL}[http]\nadvertised_url = \"{u}\"\n"))
                .map(|s| s.http.advertised_url.unwrap_or_default())
                .map_err(|e| e.to_string())
        };
        assert_eq!(
            url("http://ces-0.ces:9464/").unwrap(),
            "http://ces-0.ces:9464"
        );
        assert_eq!(
            url("https://10.0.0.7:8443").unwrap(),
            "https://10.0.0.7:8443"
        );
        for bad in [
            "ces-0:9464",
            "ftp://x",
            "http://x/api",
            "http://u:p@x",
            "http://x?a=1",
        ] {
            let e = url(bad).unwrap_err();
            assert!(e.contains("http.advertised_url"), "{bad}: {e}");
        }
    }

    #[test]
    fn effective_toml_round_trips() {
        let text =
            std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/config/default.toml"))
                .unwrap();
        let first = load(&text).unwrap();
        let printed = first.effective_toml();
        let second = load(&printed).unwrap();
        assert_eq!(printed, second.effective_toml());
        assert_eq!(first.model.activities, second.model.activities);
        assert_eq!(first.model.tiers, second.model.tiers);
        assert_eq!(first.model.signals, second.model.signals);
        assert_eq!(first.model.diversity, second.model.diversity);
        assert_eq!(
            first.model.input.segment_events,
            second.model.input.segment_events
        );
    }

    fn load_env(text: &str, vars: &[(&str, &str)]) -> Result<Settings, ConfigError> {
        let vars: std::collections::HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Settings::from_toml_with_env(text, Path::new("t.toml"), move |k| vars.get(k).cloned())
    }

    const KAFKA_WITH_REFERENCES: &str = r#"
[kafka]
brokers = "${BROKER_HOST}:9092"
group_id = "scores-${ENVIRONMENT}"
input_topics = ["${TOPIC_PREFIX}.events", "literal-$${not-a-variable}"]
output_topic = "${TOPIC_PREFIX}.signals"
[kafka.options]
"security.protocol" = "SASL_SSL"
"sasl.mechanisms" = "SCRAM-SHA-512"
"sasl.username" = "${KAFKA_USER}"
"sasl.password" = "${KAFKA_PASSWORD}"
[kafka.producer_options]
"ssl.key.password" = "${KEY_PASSWORD}"
"#;

    #[test]
    fn references_expand_in_every_kind_of_string_value() {
        let vars = [
            ("BROKER_HOST", "kafka-0.example"),
            ("ENVIRONMENT", "prod"),
            ("TOPIC_PREFIX", "shop"),
            ("KAFKA_USER", "ces"),
            ("KAFKA_PASSWORD", "pa$$w0rd\"quoted\""),
            ("KEY_PASSWORD", ""),
        ];
        let settings = load_env(KAFKA_WITH_REFERENCES, &vars).unwrap();
        let kafka = settings.kafka.as_ref().unwrap();
        assert_eq!(kafka.brokers, "kafka-0.example:9092");
        assert_eq!(kafka.group_id, "scores-prod");
        assert_eq!(
            kafka.input_topics,
            ["shop.events", "literal-${not-a-variable}"]
        );
        assert_eq!(kafka.output_topic, "shop.signals");
        let option = |name: &str| {
            kafka
                .options
                .iter()
                .chain(&kafka.producer_options)
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.as_str())
        };
        assert_eq!(option("sasl.username"), Some("ces"));
        assert_eq!(
            option("sasl.password"),
            Some("pa$$w0rd\"quoted\""),
            "a value is never parsed again: quotes and dollars in a secret are kept"
        );
        assert_eq!(option("ssl.key.password"), Some(""), "set but empty: empty");
        // The model came from the built-in one, as without references.
        assert!(settings.built_in_model);
    }

    #[test]
    fn an_unset_variable_names_the_key_and_the_variable() {
        let e = load_env(
            KAFKA_WITH_REFERENCES,
            &[
                ("BROKER_HOST", "b"),
                ("ENVIRONMENT", "e"),
                ("TOPIC_PREFIX", "t"),
                ("KAFKA_USER", "u"),
            ],
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("kafka.options.\"sasl.password\"")
                && e.contains("KAFKA_PASSWORD is not set"),
            "{e}"
        );
    }

    #[test]
    fn references_expand_with_a_scoring_section_too_and_errors_keep_their_key() {
        let text = "[scoring]\nhalf_life = \"${HALF_LIFE}\"\n[scoring.activities]\npage_view = { weight = 1.0 }\n";
        let settings = load_env(text, &[("HALF_LIFE", "7d")]).unwrap();
        assert_eq!(settings.model.half_life, 7 * 86_400_000);
        assert!(!settings.built_in_model);
        let e = load_env(text, &[("HALF_LIFE", "soon")])
            .unwrap_err()
            .to_string();
        assert!(e.contains("scoring.half_life"), "{e}");
    }

    #[test]
    fn check_config_masks_secret_options() {
        let vars = [
            ("BROKER_HOST", "b"),
            ("ENVIRONMENT", "e"),
            ("TOPIC_PREFIX", "t"),
            ("KAFKA_USER", "ces"),
            ("KAFKA_PASSWORD", "hunter2-secret"),
            ("KEY_PASSWORD", "key-secret"),
        ];
        let printed = load_env(KAFKA_WITH_REFERENCES, &vars)
            .unwrap()
            .effective_toml();
        assert!(
            !printed.contains("hunter2-secret") && !printed.contains("key-secret"),
            "{printed}"
        );
        assert!(
            printed.contains("\"sasl.password\" = \"********\""),
            "{printed}"
        );
        assert!(
            printed.contains("\"ssl.key.password\" = \"********\""),
            "{printed}"
        );
        assert!(printed.contains("\"sasl.username\" = \"ces\""), "{printed}");
    }

    #[test]
    fn forward_ca_file_must_hold_pem_certificates() {
        let dir = std::env::temp_dir().join(format!("ces-ca-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let not_pem = dir.join("not.pem");
        std::fs::write(&not_pem, "hello\n").unwrap();
        let with = |path: &Path| {
            format!(
                "[scoring.activities]\nv = {{ weight = 1.0 }}\n[http]\nforward_ca_file = \"{}\"\n",
                path.display()
            )
        };
        let e = err(&with(&dir.join("missing.pem")));
        assert!(
            e.contains("http.forward_ca_file") && e.contains("cannot read"),
            "{e}"
        );
        let e = err(&with(&not_pem));
        assert!(
            e.contains("http.forward_ca_file") && e.contains("no PEM certificate"),
            "{e}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn the_token_comes_from_a_variable_or_a_file_not_both() {
        let e = err("[scoring.activities]\nv = { weight = 1.0 }\n[http]\napi_token_env = \"T\"\napi_token_file = \"/run/secrets/token\"\n");
        assert!(
            e.contains("http.api_token_file") && e.contains("not both"),
            "{e}"
        );
        let settings = load("[scoring.activities]\nv = { weight = 1.0 }\n[http]\napi_token_file = \"/run/secrets/token\"\n").unwrap();
        assert_eq!(
            settings.http.api_token_file.as_deref(),
            Some(Path::new("/run/secrets/token"))
        );
    }
}
