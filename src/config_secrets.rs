//! Secrets kept out of the configuration file: `${VAR}` and `${file:PATH}`
//! in any string value, and the masking of secret values wherever the
//! configuration is shown.
//!
//! In Kubernetes the configuration file is a ConfigMap, which is no place
//! for a password; the password is a Secret, mounted as a file or passed as
//! an environment variable. So any string value of the file may name one:
//!
//! - `${VAR}` is replaced by the environment variable `VAR`. An unset
//!   variable is an error naming the key and the variable (a silently
//!   empty password fails later and far less clearly); a variable set to
//!   the empty string gives the empty string.
//! - `${file:PATH}` is replaced by the contents of the file at `PATH`, less
//!   one trailing newline (how `kubectl create secret` and editors leave
//!   them). An unreadable file is an error naming the key and the path.
//! - `$${` is a literal `${`; a `$` not followed by `{` is itself.
//!
//! Kafka Connect (`${file:...}` config providers), vector and docker
//! compose (`${VAR}`) use the same forms. Only the file's values are
//! expanded, never keys, and never the values of the `CES_*` variables
//! (they are the environment already).

use std::path::Path;

/// Why a value cannot be expanded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{key}: {reason}")]
pub struct InterpolationError {
    /// The key path of the value, as `kafka.options."sasl.password"`.
    pub key: String,
    pub reason: String,
}

/// Where `${...}` references are looked up.
pub struct Sources<'a> {
    pub env: &'a dyn Fn(&str) -> Option<String>,
    pub read_file: &'a dyn Fn(&Path) -> std::io::Result<String>,
}

/// Expands every string value of `table`, recursively (tables and arrays).
/// Returns whether anything changed.
pub fn expand_table(
    table: &mut toml::Table,
    sources: &Sources<'_>,
) -> Result<bool, InterpolationError> {
    let mut changed = false;
    for (key, value) in table.iter_mut() {
        changed |= expand_value(value, &crate::model::quote_key(key), sources)?;
    }
    Ok(changed)
}

fn expand_value(
    value: &mut toml::Value,
    path: &str,
    sources: &Sources<'_>,
) -> Result<bool, InterpolationError> {
    match value {
        toml::Value::String(text) => match expand(text, sources) {
            Ok(Some(expanded)) => {
                *text = expanded;
                Ok(true)
            }
            Ok(None) => Ok(false),
            Err(reason) => Err(InterpolationError {
                key: path.to_string(),
                reason,
            }),
        },
        toml::Value::Table(table) => {
            let mut changed = false;
            for (key, value) in table.iter_mut() {
                let path = format!("{path}.{}", crate::model::quote_key(key));
                changed |= expand_value(value, &path, sources)?;
            }
            Ok(changed)
        }
        toml::Value::Array(items) => {
            let mut changed = false;
            for (i, value) in items.iter_mut().enumerate() {
                changed |= expand_value(value, &format!("{path}[{i}]"), sources)?;
            }
            Ok(changed)
        }
        _ => Ok(false),
    }
}

/// The expansion of one string, or `None` when it holds nothing to expand.
/// The error names the reference, never the value it resolved to.
pub fn expand(text: &str, sources: &Sources<'_>) -> Result<Option<String>, String> {
    if !text.contains("${") {
        return Ok(None);
    }
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find('$') {
        out.push_str(&rest[..at]);
        let after = &rest[at + 1..];
        if let Some(escaped) = after.strip_prefix("${") {
            // `$${` is a literal `${`.
            out.push_str("${");
            rest = escaped;
        } else if let Some(reference) = after.strip_prefix('{') {
            let end = reference
                .find('}')
                .ok_or_else(|| format!("\"${{{reference}\" has no closing '}}'"))?;
            out.push_str(&resolve(&reference[..end], sources)?);
            rest = &reference[end + 1..];
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    Ok(Some(out))
}

/// The value of one reference, the text between `${` and `}`.
fn resolve(reference: &str, sources: &Sources<'_>) -> Result<String, String> {
    if let Some(path) = reference.strip_prefix("file:") {
        if path.is_empty() {
            return Err("${file:} names no file".into());
        }
        let text = (sources.read_file)(Path::new(path))
            .map_err(|e| format!("${{file:{path}}}: cannot read {path}: {e}"))?;
        return Ok(without_final_newline(text));
    }
    let valid_name = reference
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && reference
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_');
    if !valid_name {
        return Err(format!(
            "\"${{{reference}}}\" is neither ${{VARIABLE}} (letters, digits, '_') nor ${{file:PATH}} (write $${{ for a literal ${{)"
        ));
    }
    (sources.env)(reference).ok_or_else(|| {
        format!("the environment variable {reference} is not set (named as ${{{reference}}})")
    })
}

/// A secret file's contents less one final newline (`\n` or `\r\n`), which
/// editors and `kubectl create secret --from-file` leave.
pub fn without_final_newline(mut text: String) -> String {
    if text.ends_with('\n') {
        text.pop();
        if text.ends_with('\r') {
            text.pop();
        }
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn expand_with(
        text: &str,
        vars: &[(&str, &str)],
        files: &[(&str, &str)],
    ) -> Result<String, String> {
        let vars: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let files: HashMap<String, String> = files
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let env = move |name: &str| vars.get(name).cloned();
        let read_file = move |path: &Path| {
            files
                .get(path.to_str().unwrap_or_default())
                .cloned()
                .ok_or_else(|| std::io::Error::from(std::io::ErrorKind::NotFound))
        };
        let sources = Sources {
            env: &env,
            read_file: &read_file,
        };
        expand(text, &sources).map(|e| e.unwrap_or_else(|| text.to_string()))
    }

    #[test]
    fn variables_and_files_are_substituted_anywhere_in_a_value() {
        assert_eq!(
            expand_with("${HOST}:9092,${HOST}:9093", &[("HOST", "kafka")], &[]).unwrap(),
            "kafka:9092,kafka:9093"
        );
        assert_eq!(
            expand_with(
                "${file:/run/secrets/pw}",
                &[],
                &[("/run/secrets/pw", "s3cret\n")]
            )
            .unwrap(),
            "s3cret",
            "one trailing newline is dropped"
        );
        assert_eq!(
            expand_with("${file:/pw}", &[], &[("/pw", "a\r\n\n")]).unwrap(),
            "a\r\n",
            "only one"
        );
        assert_eq!(expand_with("${EMPTY}", &[("EMPTY", "")], &[]).unwrap(), "");
    }

    #[test]
    fn escapes_and_lone_dollars_stay_literal() {
        assert_eq!(
            expand_with("$${HOST}", &[("HOST", "x")], &[]).unwrap(),
            "${HOST}"
        );
        assert_eq!(expand_with("a$b$", &[], &[]).unwrap(), "a$b$");
        assert_eq!(
            expand_with("$$${HOST}", &[("HOST", "x")], &[]).unwrap(),
            "$${HOST}"
        );
        assert_eq!(
            expand_with("p$${x}${HOST}", &[("HOST", "h")], &[]).unwrap(),
            "p${x}h"
        );
    }

    #[test]
    fn missing_references_are_errors_that_name_the_reference_only() {
        let e = expand_with("${NOPE}", &[], &[]).unwrap_err();
        assert!(e.contains("NOPE is not set"), "{e}");
        let e = expand_with("${file:/missing}", &[], &[]).unwrap_err();
        assert!(e.contains("cannot read /missing"), "{e}");
        let e = expand_with("x${HOST", &[("HOST", "x")], &[]).unwrap_err();
        assert!(e.contains("no closing"), "{e}");
        let e = expand_with("${a-b}", &[], &[]).unwrap_err();
        assert!(e.contains("neither"), "{e}");
        let e = expand_with("${}", &[], &[]).unwrap_err();
        assert!(e.contains("neither"), "{e}");
    }
}
