//! `ces-stream report`: the figures of a small history checked by hand
//! (tests/report/: a linear model, three customers over three days; the
//! arithmetic is written below), bad input, and the page in a real
//! browser (headless Chromium, installed by scripts/ci-deps.sh). No broker.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

fn dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/report")
}

/// Runs `report` on `input` with the test model; (status, stderr, page, figures).
fn report(input: &Path, extra: &[&str]) -> (bool, String, String, Value) {
    report_with(&dir().join("model.toml"), input, extra)
}

fn report_with(config: &Path, input: &Path, extra: &[&str]) -> (bool, String, String, Value) {
    let out = tempfile::tempdir().unwrap();
    let (html, json) = (out.path().join("r.html"), out.path().join("r.json"));
    let result = Command::new(env!("CARGO_BIN_EXE_ces-stream"))
        .args(["report", "--no-progress", "--config"])
        .arg(config)
        .arg("--input")
        .arg(input)
        .arg("--output")
        .arg(&html)
        .arg("--json")
        .arg(&json)
        .args(extra)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&result.stderr).into_owned();
    let page = std::fs::read_to_string(&html).unwrap_or_default();
    let figures = std::fs::read_to_string(&json)
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok())
        .unwrap_or(Value::Null);
    (result.status.success(), stderr, page, figures)
}

/// 45 or 15 points decayed over `hours` with the model's 1000-day half-life.
fn decayed(points: f64, hours: f64) -> f64 {
    points * 2f64.powf(-hours / 24_000.0)
}

/// A JSON array of counts.
fn numbers(v: &Value) -> Vec<u64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|n| n.as_u64().unwrap())
        .collect()
}

/// A JSON array of arrays of counts.
fn matrix(v: &Value) -> Vec<Vec<u64>> {
    v.as_array().unwrap().iter().map(numbers).collect()
}

fn round2(v: f64) -> f64 {
    (v * 100.0).round() / 100.0
}

#[test]
fn the_figures_of_a_small_history_are_the_hand_checked_ones() {
    let (ok, stderr, page, f) = report(&dir().join("history.jsonl"), &["--movement-window", "1d"]);
    assert!(ok, "{stderr}");
    // Summary: 8 lines, one not JSON, one of an activity the model lacks.
    let s = &f["summary"];
    assert_eq!(s["events"], 8);
    assert_eq!(s["accepted"], 6);
    assert_eq!(s["dead_lettered"]["invalid_json"], 1);
    assert_eq!(s["ignored"]["unknown_activity"], 1);
    assert_eq!(s["customers"], 3);
    assert_eq!(s["period_start"], "2026-11-20T09:00:00.000Z");
    assert_eq!(s["period_end"], "2026-11-22T10:00:00.000Z");
    assert_eq!(s["signals"]["churn_risk"], 0);

    // Tiers (lowest first: very_disengaged <= 40 < somewhat_engaged <= 75
    // < very_engaged) as each day began:
    // - 11-20: no customer yet;
    // - 11-21: a 45 (somewhat), b 15 and c 15 (disengaged);
    // - 11-22: a 45 + 45 (very engaged), b 30, c 15 (disengaged).
    let points = f["tiers_over_time"]["points"].as_array().unwrap();
    let days: Vec<(&str, Vec<u64>)> = points
        .iter()
        .map(|p| (p["at"].as_str().unwrap(), numbers(&p["customers"])))
        .collect();
    assert_eq!(
        days,
        [
            ("2026-11-20T00:00:00.000Z", vec![0, 0, 0]),
            ("2026-11-21T00:00:00.000Z", vec![2, 1, 0]),
            ("2026-11-22T00:00:00.000Z", vec![2, 0, 1]),
        ]
    );

    // Scores at the last event (11-22 10:00), each contribution decayed
    // for the hours since its event:
    // a: 45 (49 h) + 45 (25 h) = 89.90; b: 15 (48.5 h) + 15 (24.5 h) + 15
    // (0 h) = 44.97; c: 15 (48 h) = 14.98.
    let a = decayed(45.0, 49.0) + decayed(45.0, 25.0);
    let b = decayed(15.0, 48.5) + decayed(15.0, 24.5) + 15.0;
    let c = decayed(15.0, 48.0);
    assert_eq!((round2(a), round2(b), round2(c)), (89.9, 44.97, 14.98));
    let d = &f["distribution"];
    let bins: Vec<u64> = numbers(&d["customers"]);
    assert_eq!(
        bins,
        [0, 1, 0, 0, 1, 0, 0, 0, 1, 0],
        "c in 10-20, b in 40-50, a in 80-90"
    );
    assert_eq!(d["mean_score"].as_f64().unwrap(), round2((a + b + c) / 3.0));

    // What separates the tiers: one customer each, their own numbers.
    let sep = f["separation"].as_array().unwrap();
    let contribution = |tier: usize, activity: usize| {
        sep[tier]["mean_contribution"][activity][1]
            .as_f64()
            .unwrap()
    };
    let share =
        |tier: usize, channel: usize| sep[tier]["channel_share"][channel][1].as_f64().unwrap();
    assert_eq!(
        sep.iter()
            .map(|t| t["customers"].as_u64().unwrap())
            .collect::<Vec<_>>(),
        [1, 1, 1]
    );
    assert_eq!((contribution(0, 0), contribution(0, 1)), (0.0, round2(c)));
    assert_eq!((contribution(1, 0), contribution(1, 1)), (0.0, round2(b)));
    assert_eq!((contribution(2, 0), contribution(2, 1)), (round2(a), 0.0));
    // Channels in model order: shop, web (and the default one, unused).
    assert_eq!(sep[2]["channel_share"][0][0], "shop");
    assert_eq!((share(2, 0), share(2, 1)), (1.0, 0.0), "a only buys");
    assert_eq!(
        (share(0, 0), share(0, 1)),
        (0.0, 1.0),
        "c's dance was not an activity"
    );

    // Movement since 11-21 10:00 (one day before the end): a was already
    // very engaged (its second buy at 09:00), b and c disengaged; at the
    // end b is somewhat engaged.
    let m = &f["movement"];
    assert_eq!(m["since"], "2026-11-21T10:00:00.000Z");
    let counts = matrix(&m["counts"]);
    assert_eq!(
        counts,
        [
            vec![1, 1, 0, 0], // very_disengaged -> c stays, b rises
            vec![0, 0, 0, 0],
            vec![0, 0, 1, 0], // very_engaged -> a stays
            vec![0, 0, 0, 0], // (new)
        ]
    );
    assert!(page.contains("<table id=\"movement\">"));
}

#[test]
fn an_empty_history_makes_a_report_that_says_so() {
    let tmp = tempfile::tempdir().unwrap();
    let empty = tmp.path().join("empty.jsonl");
    std::fs::write(&empty, "").unwrap();
    let (ok, stderr, page, f) = report(&empty, &[]);
    assert!(ok, "{stderr}");
    assert!(page.contains("holds no event"), "{page}");
    assert_eq!(f["summary"]["events"], 0);
    assert_eq!(
        f["distribution"]["customers"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|n| n.as_u64() != Some(0))
            .count(),
        0
    );
}

#[test]
fn invalid_lines_are_counted_never_fatal() {
    let tmp = tempfile::tempdir().unwrap();
    let input = tmp.path().join("bad.jsonl");
    let mut text = String::new();
    for i in 0..50 {
        text.push_str(match i % 5 {
            0 => "{\"customer_id\":\"x\"\n",
            1 => "[1,2]\n",
            2 => "\u{0}\u{1}binary\n",
            _ => "{\"customer_id\":\"a\",\"type\":\"visit\",\"timestamp\":\"2026-11-20T09:00:00Z\"}\n",
        });
    }
    std::fs::write(&input, text).unwrap();
    let (ok, stderr, page, f) = report(&input, &[]);
    assert!(ok, "{stderr}");
    let dead: u64 = f["summary"]["dead_lettered"]
        .as_object()
        .unwrap()
        .values()
        .map(|v| v.as_u64().unwrap())
        .sum();
    assert_eq!(dead, 30);
    assert_eq!(f["summary"]["accepted"], 20);
    assert!(page.contains("dead-lettered: invalid_json"), "{page}");
}

/// Headless Chromium on `page`: (the DOM once loaded, its log).
fn chromium(page: &Path, args: &[&str]) -> (String, String) {
    let out = Command::new("chromium")
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--hide-scrollbars",
        ])
        .args(["--enable-logging=stderr", "--v=0"])
        .args(args)
        .arg(format!("file://{}", page.display()))
        .output()
        .unwrap_or_else(|e| {
            panic!("cannot run chromium ({e}): run scripts/ci-deps.sh, which installs it")
        });
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The cells of each row of the table with `id` in `dom`, as text.
fn table(dom: &str, id: &str) -> Vec<Vec<String>> {
    let start = dom
        .find(&format!("<table id=\"{id}\">"))
        .unwrap_or_else(|| panic!("no table {id}"));
    let end = start + dom[start..].find("</table>").unwrap();
    dom[start..end]
        .split("<tr>")
        .skip(1)
        .map(|row| {
            row.split("<td")
                .skip(1)
                .map(|cell| {
                    let text = &cell[cell.find('>').unwrap() + 1..];
                    text[..text.find("</td>").unwrap()].to_string()
                })
                .collect()
        })
        .collect()
}

#[test]
fn the_page_in_a_real_browser_draws_every_chart_fetches_nothing_and_shows_the_json_figures() {
    let tmp = tempfile::tempdir().unwrap();
    let history = tmp.path().join("history.jsonl");
    let generated = Command::new(env!("CARGO_BIN_EXE_ces-stream"))
        .args([
            "generate",
            "--events",
            "30000",
            "--customers",
            "800",
            "--span",
            "40d",
            "--output",
        ])
        .arg(&history)
        .output()
        .unwrap();
    assert!(generated.status.success());
    let config = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/default.toml");
    let out = tmp.path().join("page");
    std::fs::create_dir_all(&out).unwrap();
    let html = out.join("report.html");
    let (ok, stderr, page, figures) = report_with(&config, &history, &[]);
    assert!(ok, "{stderr}");
    std::fs::write(&html, &page).unwrap();

    // Self-contained: no reference to anything outside the page, and a
    // policy that forbids fetching any.
    assert!(page.contains("Content-Security-Policy") && page.contains("default-src 'none'"));
    for reference in [" src=", " href=", "url(", "@import", "<script"] {
        assert!(!page.contains(reference), "the page has {reference}");
    }
    assert!(page.len() < 2 << 20, "{} bytes", page.len());

    let (dom, log) = chromium(&html, &["--dump-dom"]);
    // Any console message (a script error, a blocked fetch) is a failure.
    let console: Vec<&str> = log.lines().filter(|l| l.contains("CONSOLE")).collect();
    assert!(console.is_empty(), "{console:#?}");

    // Every chart drawn, with a size and with something in it: the tiers
    // over time, the churn signals per day, the distribution.
    let charts: Vec<&str> = dom.split("<svg").skip(1).collect();
    assert_eq!(charts.len(), 3, "three charts");
    for chart in &charts {
        let size = |attribute: &str| -> u32 {
            let at = chart.find(&format!("{attribute}=\"")).unwrap() + attribute.len() + 2;
            chart[at..at + chart[at..].find('"').unwrap()]
                .parse()
                .unwrap()
        };
        assert!(size("width") > 100 && size("height") > 100);
        let shapes = chart.matches("<rect").count()
            + chart.matches("<polyline").count()
            + chart.matches("<polygon").count()
            + chart.matches("<path").count();
        assert!(shapes > 10, "an empty chart: {shapes} shapes");
    }

    // The tables hold the numbers of --json.
    let summary = table(&dom, "summary");
    assert_eq!(summary[1][0], figures["summary"]["events"].to_string());
    assert_eq!(summary[2][0], figures["summary"]["accepted"].to_string());
    let distribution = table(&dom, "distribution");
    let bins: Vec<String> = figures["distribution"]["customers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n.to_string())
        .collect();
    assert_eq!(
        distribution
            .iter()
            .skip(1)
            .map(|r| r[1].clone())
            .collect::<Vec<_>>(),
        bins
    );
    let movement = table(&dom, "movement");
    let counts: Vec<Vec<String>> = figures["movement"]["counts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|row| {
            row.as_array()
                .unwrap()
                .iter()
                .map(|n| n.to_string())
                .collect()
        })
        .collect();
    assert_eq!(
        movement
            .iter()
            .skip(1)
            .map(|r| r[1..].to_vec())
            .collect::<Vec<_>>(),
        counts
    );
    let tiers = table(&dom, "tiers-over-time");
    assert_eq!(
        tiers.len() - 1,
        figures["tiers_over_time"]["points"]
            .as_array()
            .unwrap()
            .len()
    );

    // A screenshot for anyone to look at.
    let shot = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/report-screenshot.png");
    let (_, log) = chromium(
        &html,
        &[
            "--window-size=1300,3200",
            &format!("--screenshot={}", shot.display()),
        ],
    );
    assert!(
        shot.metadata().is_ok_and(|m| m.len() > 50_000),
        "no screenshot: {log}"
    );
}

#[test]
fn a_comparison_with_a_model_of_other_tiers_names_both_and_finds_the_mover() {
    let other = dir().join("other.toml");
    let (ok, stderr, page, f) = report(
        &dir().join("history.jsonl"),
        &["--compare", other.to_str().unwrap()],
    );
    assert!(ok, "{stderr}");
    let c = &f["comparison"];
    assert_eq!(
        c["tiers"],
        serde_json::json!(["very_disengaged", "somewhat_engaged", "very_engaged"])
    );
    assert_eq!(c["other_tiers"], serde_json::json!(["low", "high"]));
    // Under the other model a has 20 + 20 (decayed: 39.96), b and c as
    // before (44.97, 14.98): all three are "low".
    assert_eq!(c["migration"], serde_json::json!([[1, 0], [1, 0], [1, 0]]));
    let a_this = decayed(45.0, 49.0) + decayed(45.0, 25.0);
    let a_other = decayed(20.0, 49.0) + decayed(20.0, 25.0);
    let mover = &c["top_movers"][0];
    assert_eq!(mover["customer_id"], "a");
    assert_eq!(mover["score"].as_f64().unwrap(), round2(a_this));
    assert_eq!(mover["other_score"].as_f64().unwrap(), round2(a_other));
    assert_eq!(c["top_movers"].as_array().unwrap().len(), 3);
    // b and c score the same under both: a difference of 0; a's is -49.94.
    let bins: Vec<u64> = numbers(&c["difference_customers"]);
    assert_eq!((bins[10], bins[5], bins.iter().sum::<u64>()), (2, 1, 3));
    assert!(
        page.contains("<th>low</th>") && page.contains("<td>very_engaged</td>"),
        "{page}"
    );
}

/// Reads a JSONL file.
fn lines(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn on_a_generated_history_the_figures_agree_with_replays_own_outputs_and_final_state() {
    let tmp = tempfile::tempdir().unwrap();
    let history = generated(tmp.path(), "40000", "1500", "30d");
    let config = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/default.toml");
    let (ok, stderr, _, f) = report_with(&config, &history, &[]);
    assert!(ok, "{stderr}");

    // replay, with the final state at the report's end (the last event).
    let end = f["summary"]["period_end"].as_str().unwrap();
    let (outputs, state) = replay_outputs_and_state(&config, &history, end);

    // Signals by kind, and churn signals per day, from replay's outputs.
    for kind in [
        "score_changed",
        "churn_risk",
        "churn_risk_cleared",
        "customer_erased",
    ] {
        let n = outputs.iter().filter(|o| o["kind"] == kind).count() as u64;
        assert_eq!(f["summary"]["signals"][kind].as_u64().unwrap(), n, "{kind}");
    }
    let mut churn: std::collections::BTreeMap<String, (u64, u64)> = Default::default();
    for o in &outputs {
        let day = format!("{}T00:00:00.000Z", &o["at"].as_str().unwrap_or("")[..10]);
        match o["kind"].as_str() {
            Some("churn_risk") => churn.entry(day).or_default().0 += 1,
            Some("churn_risk_cleared") => churn.entry(day).or_default().1 += 1,
            _ => {}
        }
    }
    let reported: std::collections::BTreeMap<String, (u64, u64)> = f["churn_per_day"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| {
            (
                d["day"].as_str().unwrap().to_string(),
                (
                    d["churn_risk"].as_u64().unwrap(),
                    d["churn_risk_cleared"].as_u64().unwrap(),
                ),
            )
        })
        .collect();
    assert_eq!(reported, churn);

    // The distribution, the tiers and the mean contributions at the end,
    // from the final state.
    assert_eq!(
        f["summary"]["customers"].as_u64().unwrap(),
        state.len() as u64
    );
    let mut bins = vec![0u64; 10];
    let mut sum = 0.0;
    for s in &state {
        let score = s["score"].as_f64().unwrap();
        sum += score;
        bins[((score / 10.0).floor() as usize).min(9)] += 1;
    }
    let reported_bins: Vec<u64> = numbers(&f["distribution"]["customers"]);
    // Final-state scores are rounded to 0.01: a score within 0.005 of a
    // bin bound may land on either side; none does here, or the counts
    // differ by at most that many.
    let near_bounds = state
        .iter()
        .filter(|s| {
            let score = s["score"].as_f64().unwrap();
            let frac = score / 10.0 - (score / 10.0).round();
            frac.abs() < 0.001 && score > 0.0
        })
        .count() as u64;
    let off: u64 = reported_bins
        .iter()
        .zip(&bins)
        .map(|(a, b)| a.abs_diff(*b))
        .sum();
    assert!(off <= 2 * near_bounds, "{reported_bins:?} against {bins:?}");
    let mean = (sum / state.len() as f64 * 100.0).round() / 100.0;
    assert!((f["distribution"]["mean_score"].as_f64().unwrap() - mean).abs() <= 0.01);
    for (t, profile) in f["separation"].as_array().unwrap().iter().enumerate() {
        let tier = f["tiers"][t].as_str().unwrap();
        let members: Vec<&Value> = state.iter().filter(|s| s["tier"] == tier).collect();
        assert_eq!(
            profile["customers"].as_u64().unwrap(),
            members.len() as u64,
            "{tier}"
        );
        for pair in profile["mean_contribution"].as_array().unwrap() {
            let activity = pair[0].as_str().unwrap();
            let expected = members
                .iter()
                .map(|s| s["contributions"][activity].as_f64().unwrap_or(0.0))
                .sum::<f64>()
                / members.len().max(1) as f64;
            // Each final-state contribution is rounded to 0.01.
            assert!(
                (pair[1].as_f64().unwrap() - expected).abs() <= 0.011,
                "{tier} {activity}: {} against {expected}",
                pair[1]
            );
        }
    }
}

#[test]
fn segments_by_attribute_by_channel_and_by_an_unknown_key() {
    let history = dir().join("history.jsonl");
    let rows = |f: &Value| -> Vec<(String, u64, f64)> {
        f["segments"]["rows"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| {
                (
                    r["segment"].as_str().unwrap().to_string(),
                    r["customers"].as_u64().unwrap(),
                    r["mean_score"].as_f64().unwrap(),
                )
            })
            .collect()
    };
    let a_raw = decayed(45.0, 49.0) + decayed(45.0, 25.0);
    let b_raw = decayed(15.0, 48.5) + decayed(15.0, 24.5) + 15.0;
    let c_raw = decayed(15.0, 48.0);
    let (a, b, c) = (round2(a_raw), round2(b_raw), round2(c_raw));
    // a's events say plan "pro", b's "free", c's none.
    let (ok, stderr, page, f) = report(&history, &["--segment-by", "plan"]);
    assert!(ok, "{stderr}");
    assert_eq!(
        rows(&f),
        [
            ("(none)".into(), 1, c),
            ("free".into(), 1, b),
            ("pro".into(), 1, a)
        ]
    );
    assert!(page.contains("<table id=\"segments\">"));
    // Main channels: a buys (shop), b and c visit (web).
    let (_, _, _, f) = report(&history, &["--segment-by", "channel"]);
    assert_eq!(
        rows(&f),
        [
            ("web".into(), 2, round2((b_raw + c_raw) / 2.0)),
            ("shop".into(), 1, a)
        ]
    );
    // A key no event has: everyone in (none), and the page says why.
    let (_, _, page, f) = report(&history, &["--segment-by", "tenant"]);
    assert_eq!(rows(&f).len(), 1);
    assert!(
        page.contains("no accepted event has attributes.tenant"),
        "{page}"
    );
}

#[test]
fn counters_follow_the_records_an_erasure_moves() {
    // x, y, z take slots 0, 1, 2; erasing x moves z's record into slot 0,
    // and z's next event must count for z, not for what x left there.
    let tmp = tempfile::tempdir().unwrap();
    let input = tmp.path().join("erasure.jsonl");
    std::fs::write(
        &input,
        [
            r#"{"customer_id":"x","type":"buy","timestamp":"2026-11-20T09:00:00Z"}"#,
            r#"{"customer_id":"y","type":"buy","timestamp":"2026-11-20T09:10:00Z"}"#,
            r#"{"customer_id":"z","type":"visit","timestamp":"2026-11-20T09:20:00Z"}"#,
            r#"{"erase":"x"}"#,
            r#"{"customer_id":"z","type":"visit","timestamp":"2026-11-20T09:30:00Z"}"#,
        ]
        .join("\n"),
    )
    .unwrap();
    let (ok, stderr, _, f) = report(&input, &["--segment-by", "channel"]);
    assert!(ok, "{stderr}");
    assert_eq!(f["summary"]["customers"], 2);
    // z (30 points, disengaged) only visited the web; y (45, somewhat
    // engaged) only bought.
    let sep = &f["separation"];
    assert_eq!(sep[0]["customers"], 1);
    assert_eq!(sep[0]["channel_share"][1], serde_json::json!(["web", 1.0]));
    assert_eq!(sep[1]["channel_share"][0], serde_json::json!(["shop", 1.0]));
    let segments: Vec<&str> = f["segments"]["rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["segment"].as_str().unwrap())
        .collect();
    assert_eq!(segments, ["shop", "web"]);
    // The window (30 days) starts before any event: both are new.
    assert_eq!(f["movement"]["counts"][3], serde_json::json!([1, 1, 0, 0]));
}

#[test]
fn movement_follows_erased_forgotten_and_returning_customers() {
    // The test model, with customers forgotten after two silent days
    // (sweeps every hour). The window is the last day: since 11-25 00:00.
    let tmp = tempfile::tempdir().unwrap();
    let model = std::fs::read_to_string(dir().join("model.toml"))
        .unwrap()
        .replace("[scoring]\n", "[scoring]\nforget_after = \"2d\"\n");
    let config = tmp.path().join("model.toml");
    std::fs::write(&config, model).unwrap();
    let input = tmp.path().join("history.jsonl");
    let event = |id: &str, kind: &str, at: &str| {
        format!(r#"{{"customer_id":"{id}","type":"{kind}","timestamp":"2026-11-{at}:00Z"}}"#)
    };
    std::fs::write(
        &input,
        [
            // reborn: forgotten at the 11-23 09:00 sweep, back (15 points)
            // on 11-24, before the window: very disengaged at its start
            // and end.
            event("reborn", "buy", "21T09:00"),
            // forgotten_early: forgotten at 11-24 10:00, before the window:
            // in no row at all.
            event("forgotten_early", "buy", "22T10:00"),
            // returning: erased before the window, back within it: new.
            event("returning", "buy", "22T11:00"),
            event("bounce", "buy", "23T00:30"),
            event("forgotten_late", "buy", "23T06:00"),
            r#"{"erase":"returning"}"#.to_string(),
            // erased: very engaged (90) at the start, erased within.
            event("erased", "buy", "24T08:00"),
            event("stays", "visit", "24T09:00"),
            event("erased", "buy", "24T11:00"),
            event("reborn", "visit", "24T12:00"),
            // bounce: somewhat engaged at the start; its own event comes
            // after the 11-25 01:00 sweep forgot it, and starts it anew
            // (45 points): somewhat engaged at the end.
            event("bounce", "buy", "25T01:30"),
            // forgotten_late was forgotten by the 11-25 06:00 sweep: gone.
            event("returning", "visit", "25T08:00"),
            r#"{"erase":"erased"}"#.to_string(),
            event("stays", "visit", "26T00:00"),
        ]
        .join("\n"),
    )
    .unwrap();
    let (ok, stderr, _, f) = report_with(&config, &input, &["--movement-window", "1d"]);
    assert!(ok, "{stderr}");
    assert_eq!(f["movement"]["since"], "2026-11-25T00:00:00.000Z");
    // Held at the end: reborn, bounce, stays, returning.
    assert_eq!(f["summary"]["customers"], 4);
    let counts = matrix(&f["movement"]["counts"]);
    assert_eq!(
        counts,
        [
            vec![2, 0, 0, 0], // very_disengaged: reborn and stays stay
            vec![0, 1, 0, 1], // somewhat_engaged: bounce stays, forgotten_late gone
            vec![0, 0, 0, 1], // very_engaged: erased gone
            vec![1, 0, 0, 0], // (new): returning
        ]
    );
    // The same start given as a time.
    let (ok, stderr, _, at) = report_with(&config, &input, &["--since", "2026-11-25T00:00:00Z"]);
    assert!(ok, "{stderr}");
    assert_eq!(at["movement"], f["movement"]);
    // Before every event: everyone held at the end is new.
    let (_, _, _, early) = report_with(&config, &input, &["--since", "2026-11-01T00:00:00Z"]);
    assert_eq!(
        early["movement"]["counts"][3],
        serde_json::json!([3, 1, 0, 0])
    );
    let (ok, stderr, _, _) = report_with(&config, &input, &["--since", "yesterday"]);
    assert!(
        !ok && stderr.contains("\"yesterday\" is not an RFC 3339 time"),
        "{stderr}"
    );
}

/// A history of `events` over `customers` and `span` made by `generate`
/// (with erasures) in `dir`.
fn generated(dir: &Path, events: &str, customers: &str, span: &str) -> PathBuf {
    let history = dir.join("history.jsonl");
    let status = Command::new(env!("CARGO_BIN_EXE_ces-stream"))
        .args(["generate", "--events", events, "--customers", customers])
        .args(["--span", span, "--erasures", "0.002", "--output"])
        .arg(&history)
        .status()
        .unwrap();
    assert!(status.success());
    history
}

/// `replay` of `history` under `config`: its outputs and its final state
/// at `at`.
fn replay_outputs_and_state(config: &Path, history: &Path, at: &str) -> (Vec<Value>, Vec<Value>) {
    let tmp = tempfile::tempdir().unwrap();
    let (outputs, state) = (tmp.path().join("out.jsonl"), tmp.path().join("state.jsonl"));
    let replayed = Command::new(env!("CARGO_BIN_EXE_ces-stream"))
        .args(["replay", "--no-progress", "--config"])
        .arg(config)
        .arg("--input")
        .arg(history)
        .arg("--output")
        .arg(&outputs)
        .arg("--final-state")
        .arg(&state)
        .args(["--at", at])
        .output()
        .unwrap();
    assert!(replayed.status.success());
    (lines(&outputs), lines(&state))
}

#[test]
fn a_comparison_on_a_generated_history_agrees_with_two_replays() {
    // Both models go over the history in one pass: parsed once when they
    // read events alike (purchases worth more, more hysteresis), parsed
    // again under the other when they do not (social_like unknown there,
    // so those events are ignored by the other model only).
    let tmp = tempfile::tempdir().unwrap();
    let history = generated(tmp.path(), "30000", "1200", "60d");
    let config = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/default.toml");
    let default = std::fs::read_to_string(&config).unwrap();
    let alike = default
        .replace("purchase = { weight = 10.0", "purchase = { weight = 25.0")
        .replace("tier_hysteresis = 2.0", "tier_hysteresis = 3.0");
    let unlike = default
        .lines()
        .filter(|l| !l.starts_with("social_like ="))
        .collect::<Vec<_>>()
        .join("\n");
    assert!(alike != default && unlike != default);
    for (name, text) in [("alike", alike), ("unlike", unlike)] {
        let other = tmp.path().join(format!("{name}.toml"));
        std::fs::write(&other, text).unwrap();
        let (ok, stderr, _, f) =
            report_with(&config, &history, &["--compare", other.to_str().unwrap()]);
        assert!(ok, "{name}: {stderr}");
        let end = f["summary"]["period_end"].as_str().unwrap();
        let (this_outputs, this_state) = replay_outputs_and_state(&config, &history, end);
        let (other_outputs, other_state) = replay_outputs_and_state(&other, &history, end);
        let c = &f["comparison"];

        // The migration matrix, from the two final states.
        let tier_index = |names: &Value, tier: &Value| {
            names
                .as_array()
                .unwrap()
                .iter()
                .position(|n| n == tier)
                .unwrap()
        };
        let others: std::collections::HashMap<&str, &Value> = other_state
            .iter()
            .map(|s| (s["customer_id"].as_str().unwrap(), s))
            .collect();
        let mut migration = vec![vec![0u64; 3]; 3];
        let mut both = 0u64;
        for s in &this_state {
            if let Some(o) = others.get(s["customer_id"].as_str().unwrap()) {
                both += 1;
                migration[tier_index(&c["tiers"], &s["tier"])]
                    [tier_index(&c["other_tiers"], &o["tier"])] += 1;
            }
        }
        let reported = matrix(&c["migration"]);
        assert_eq!(reported, migration, "{name}");
        assert!(
            migration[0][0] < both,
            "{name}: the models agree everywhere"
        );
        assert_eq!(
            c["only_this"].as_u64().unwrap(),
            this_state.len() as u64 - both
        );
        assert_eq!(
            c["only_other"].as_u64().unwrap(),
            other_state.len() as u64 - both
        );

        // Churn alerts per week, from the two replays' outputs.
        let churn =
            |outputs: &[Value]| outputs.iter().filter(|o| o["kind"] == "churn_risk").count() as u64;
        let weeks = c["churn_per_week"].as_array().unwrap();
        let total = |key: &str| weeks.iter().map(|w| w[key].as_u64().unwrap()).sum::<u64>();
        assert_eq!(total("this_model"), churn(&this_outputs), "{name}");
        assert_eq!(total("other_model"), churn(&other_outputs), "{name}");
        assert!(
            churn(&this_outputs) > 0,
            "{name}: no churn alert to compare"
        );
    }
}
