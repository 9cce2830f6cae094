//! Secrets out of the configuration file, through the binary: `${VAR}` and
//! `${file:PATH}` references, and `check-config` never showing a secret.
//! No broker: `check-config` does not connect. (The SASL_SSL run on Apache
//! Kafka, and its logs, are in `tests/security_kafka.rs`.)

use std::process::Command;

const SECRET: &str = "correct-horse-battery-staple";

fn config(dir: &std::path::Path) -> std::path::PathBuf {
    let secret_file = dir.join("kafka-password");
    // As Kubernetes mounts a Secret: the value and a newline.
    std::fs::write(&secret_file, format!("{SECRET}\n")).unwrap();
    let path = dir.join("config.toml");
    std::fs::write(
        &path,
        format!(
            r#"
[kafka]
brokers = "${{CES_TEST_BROKERS}}"
group_id = "scores"
input_topics = ["${{CES_TEST_TOPIC}}"]
[kafka.options]
"security.protocol" = "SASL_SSL"
"sasl.mechanisms" = "SCRAM-SHA-512"
"sasl.username" = "ces"
"sasl.password" = "${{file:{}}}"
[kafka.consumer_options]
"ssl.key.password" = "${{CES_TEST_OAUTH}}"
"#,
            secret_file.display()
        ),
    )
    .unwrap();
    path
}

fn check_config(path: &std::path::Path, vars: &[(&str, &str)]) -> (bool, String, String) {
    let mut command = Command::new(env!("CARGO_BIN_EXE_ces-stream"));
    command
        .arg("check-config")
        .arg(path)
        .env("RUST_LOG", "trace")
        .env_remove("CES_TEST_OAUTH");
    for (k, v) in vars {
        command.env(k, v);
    }
    let out = command.output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn check_config_expands_references_and_masks_every_secret() {
    let dir = tempfile::tempdir().unwrap();
    let path = config(dir.path());
    let (ok, stdout, stderr) = check_config(
        &path,
        &[
            ("CES_TEST_BROKERS", "kafka-0:9093,kafka-1:9093"),
            ("CES_TEST_TOPIC", "clicks"),
            ("CES_TEST_OAUTH", "oauth-client-secret-value"),
        ],
    );
    assert!(ok, "{stderr}");
    assert!(
        stdout.contains("brokers = \"kafka-0:9093,kafka-1:9093\""),
        "{stdout}"
    );
    assert!(stdout.contains("input_topics = [\"clicks\"]"), "{stdout}");
    assert!(
        stdout.contains("\"sasl.password\" = \"********\""),
        "{stdout}"
    );
    assert!(
        stdout.contains("\"ssl.key.password\" = \"********\""),
        "{stdout}"
    );
    for secret in [SECRET, "oauth-client-secret-value"] {
        assert!(
            !stdout.contains(secret) && !stderr.contains(secret),
            "the secret {secret} is shown:\n{stdout}\n{stderr}"
        );
    }
}

#[test]
fn an_unset_variable_or_a_missing_file_is_a_clear_error_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let path = config(dir.path());
    let (ok, _, stderr) = check_config(&path, &[("CES_TEST_BROKERS", "b:9092")]);
    assert!(!ok);
    assert!(
        stderr.contains("kafka.input_topics[0]") && stderr.contains("CES_TEST_TOPIC is not set"),
        "{stderr}"
    );
    std::fs::remove_file(dir.path().join("kafka-password")).unwrap();
    let (ok, _, stderr) = check_config(
        &path,
        &[
            ("CES_TEST_BROKERS", "b:9092"),
            ("CES_TEST_TOPIC", "t"),
            ("CES_TEST_OAUTH", "o"),
        ],
    );
    assert!(!ok);
    assert!(
        stderr.contains("kafka.options.\"sasl.password\"") && stderr.contains("cannot read"),
        "{stderr}"
    );
}
