//! `[snapshot]`: where `run` keeps its state, raw as in the file and
//! validated.

use std::path::PathBuf;
use std::time::Duration;

use indexmap::IndexMap;
use serde::{Deserialize, Serialize};

use crate::config_blocks::InvalidSetting;
use crate::config_blocks::{check, HumanDuration, OptionValue};
use crate::model::quote_key;

/// `[snapshot]`: where `run` keeps its state.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawSnapshot {
    /// `local` (default), `kafka` or `none`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub store: Option<StoreKind>,
    /// Local store directory; default `state`. Env: `CES_SNAPSHOT_DIR`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dir: Option<PathBuf>,
    /// Default 30s; snapshots are also taken on revoke and on shutdown.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interval: Option<HumanDuration>,
    /// Snapshots kept per partition; default 3.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keep: Option<i64>,
    /// The changelog topic of the `kafka` store; default `<group_id>-state`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub topic: Option<String>,
    /// The changelog's replication factor when ces-stream creates it;
    /// default: the broker's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replication_factor: Option<i64>,
    /// Topic configs of a changelog ces-stream creates (it is always
    /// compacted); default `min.compaction.lag.ms` = 86400000 (a day).
    #[serde(default, skip_serializing_if = "IndexMap::is_empty")]
    pub topic_config: IndexMap<String, OptionValue>,
}

/// `[snapshot]`, validated.
#[derive(Debug, Clone, PartialEq)]
pub struct SnapshotSettings {
    pub store: StoreKind,
    pub dir: PathBuf,
    pub interval: Duration,
    pub keep: usize,
    /// The changelog topic of the kafka store; default `<group_id>-state`.
    pub topic: Option<String>,
    /// The changelog's replication factor when ces-stream creates it;
    /// `None`: the broker's default.
    pub replication_factor: Option<i32>,
    /// Topic configs of a changelog ces-stream creates, besides
    /// `cleanup.policy = compact`: by default `min.compaction.lag.ms` of a
    /// day (see `changelog`).
    pub topic_config: Vec<(String, String)>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StoreKind {
    /// A directory of snapshot files.
    Local,
    /// A compacted changelog topic.
    Kafka,
    /// No snapshots: every assignment rebuilds from the log.
    None,
}

pub fn build_snapshot(raw: Option<&RawSnapshot>) -> Result<SnapshotSettings, InvalidSetting> {
    let raw = raw.cloned().unwrap_or_default();
    let interval = raw.interval.map_or(Duration::from_secs(30), |d| d.0);
    check("snapshot.interval", !interval.is_zero(), "must be positive")?;
    let keep = raw.keep.unwrap_or(3);
    check(
        "snapshot.keep",
        (1..=1000).contains(&keep),
        "must be between 1 and 1000",
    )?;
    let dir = raw.dir.unwrap_or_else(|| PathBuf::from("state"));
    check(
        "snapshot.dir",
        !dir.as_os_str().is_empty(),
        "cannot be empty",
    )?;
    if let Some(t) = &raw.topic {
        check("snapshot.topic", !t.is_empty(), "cannot be empty")?;
    }
    if let Some(r) = raw.replication_factor {
        check(
            "snapshot.replication_factor",
            (1..=i64::from(i16::MAX)).contains(&r),
            "must be at least 1",
        )?;
    }
    let mut topic_config = vec![("min.compaction.lag.ms".to_string(), "86400000".to_string())];
    for (k, v) in &raw.topic_config {
        let key = format!("snapshot.topic_config.{}", quote_key(k));
        check(
            &key,
            k != "cleanup.policy",
            "cannot be set: the changelog is always compacted",
        )?;
        topic_config.retain(|(name, _)| name != k);
        topic_config.push((k.clone(), v.to_string()));
    }
    Ok(SnapshotSettings {
        store: raw.store.unwrap_or(StoreKind::Local),
        dir,
        interval,
        keep: keep as usize,
        topic: raw.topic,
        replication_factor: raw.replication_factor.map(|r| r as i32),
        topic_config,
    })
}

impl SnapshotSettings {
    /// The raw form with every default written out (`check-config`).
    pub fn to_raw(&self) -> RawSnapshot {
        RawSnapshot {
            store: Some(self.store),
            dir: Some(self.dir.clone()),
            interval: Some(HumanDuration(self.interval)),
            keep: Some(self.keep as i64),
            topic: self.topic.clone(),
            replication_factor: self.replication_factor.map(i64::from),
            topic_config: self
                .topic_config
                .iter()
                .map(|(k, v)| (k.clone(), OptionValue::Text(v.clone())))
                .collect(),
        }
    }
}
