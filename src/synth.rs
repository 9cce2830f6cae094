//! A synthetic clickstream with customer personas, for the demo, load tests
//! and benchmarks.
//!
//! Deterministic for a given seed. Each customer has a persona that decides
//! how often it acts, through which channels, and how that changes over the
//! stream's "phase" (0 at the start, 1 at the end of a file; cycling in live
//! mode): loyal customers stay busy, steady ones tick along, declining ones
//! fade, churning ones stop and leave with an unsubscribe or a bad NPS
//! answer, and a few bots fire bursts of page views. A small share of
//! events is malformed on purpose, to exercise the dead-letter path.

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

use crate::output::push_json_str;
use crate::timestamp::{format_rfc3339, Millis};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Persona {
    Loyal,
    Steady,
    Declining,
    Churning,
    Bot,
}

impl Persona {
    /// The persona of customer `i`: a fixed spread over the population.
    pub fn of(i: u64) -> Persona {
        match (i.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 32) % 100 {
            0..=14 => Persona::Loyal,
            15..=59 => Persona::Steady,
            60..=79 => Persona::Declining,
            80..=98 => Persona::Churning,
            _ => Persona::Bot,
        }
    }

    /// When a churning customer `i` leaves: its own phase in [0.1, 0.6),
    /// so that churn shows all along a stream, from early on.
    fn churn_at(i: u64) -> f64 {
        0.1 + 0.5 * ((i.wrapping_mul(0xD6E8_FEB8_6659_FD93) >> 40) as f64 / (1u64 << 24) as f64)
    }

    /// Relative activity of customer `i` at `phase` in [0, 1]. A churning
    /// customer leaves with a short burst of complaints (an unsubscribe, a
    /// bad NPS answer, a ticket), then all but stops.
    fn activity(self, i: u64, phase: f64) -> f64 {
        match self {
            Persona::Loyal => 1.0,
            Persona::Steady => 0.45,
            Persona::Declining => 0.9 * (1.0 - phase).max(0.05),
            Persona::Churning => {
                let at = Self::churn_at(i);
                if phase < at || (phase - at) < 0.02 {
                    0.8
                } else {
                    0.02
                }
            }
            Persona::Bot => 0.3,
        }
    }

    /// Whether customer `i` has begun to churn at `phase`.
    fn churned(self, i: u64, phase: f64) -> bool {
        self == Persona::Churning && phase >= Self::churn_at(i)
    }
}

/// The shape of the generated stream.
#[derive(Debug, Clone)]
pub struct SynthOptions {
    pub customers: u64,
    pub seed: u64,
    /// Share of malformed events, in [0, 1].
    pub malformed: f64,
    /// Share of events in the Segment format, in [0, 1].
    pub segment: f64,
    /// Share of events that are a producer's retry: a recent event sent
    /// again with the same id, in [0, 1].
    pub duplicates: f64,
    /// Share of events that are erasure requests (`{"erase": id}`; a
    /// tombstone on Kafka), a few of them malformed, in [0, 1].
    pub erasures: f64,
}

impl Default for SynthOptions {
    fn default() -> Self {
        SynthOptions {
            customers: 10_000,
            seed: 42,
            malformed: 0.001,
            segment: 0.1,
            duplicates: 0.0,
            erasures: 0.0,
        }
    }
}

/// One generated event: the key (customer id) and the JSON payload.
#[derive(Debug, Clone, Default)]
pub struct SynthEvent {
    pub key: String,
    pub payload: Vec<u8>,
    pub persona: Option<Persona>,
    /// An erasure request: on Kafka a tombstone (key, no value) rather
    /// than the JSON `payload`.
    pub erase: bool,
}

pub struct Synth {
    opts: SynthOptions,
    rng: SmallRng,
    seq: u64,
    /// A bot's remaining burst: (customer, events left).
    burst: Option<(u64, u32)>,
    /// Recent valid events, (key, payload), for retries.
    recent: std::collections::VecDeque<(String, Vec<u8>)>,
}

/// Recent events a retry can repeat.
const RECENT: usize = 32;

const SEGMENTS: [&str; 4] = ["smb", "mid_market", "enterprise", "consumer"];
const PAGES: [&str; 6] = [
    "/",
    "/pricing",
    "/docs",
    "/blog/launch",
    "/account",
    "/checkout",
];

impl Synth {
    pub fn new(opts: SynthOptions) -> Synth {
        let rng = SmallRng::seed_from_u64(opts.seed);
        Synth {
            opts,
            rng,
            seq: 0,
            burst: None,
            recent: std::collections::VecDeque::with_capacity(RECENT),
        }
    }

    pub fn customer_id(i: u64) -> String {
        format!("c-{i:07}")
    }

    /// The next event at time `t`, with the stream at `phase` in [0, 1].
    pub fn next(&mut self, t: Millis, phase: f64, out: &mut SynthEvent) {
        self.seq += 1;
        out.payload.clear();
        out.erase = false;
        // The options at 0 draw nothing, so that a seed gives the same
        // stream as before they existed.
        if self.opts.duplicates > 0.0
            && !self.recent.is_empty()
            && self.rng.random_bool(self.opts.duplicates.clamp(0.0, 1.0))
        {
            let i = self.rng.random_range(0..self.recent.len());
            let (key, payload) = &self.recent[i];
            out.key.clone_from(key);
            out.payload.extend_from_slice(payload);
            out.persona = None;
            return;
        }
        if self.opts.erasures > 0.0 && self.rng.random_bool(self.opts.erasures.clamp(0.0, 1.0)) {
            self.erasure(out);
            return;
        }
        let customer = self.pick_customer(phase);
        let persona = Persona::of(customer);
        out.key = Self::customer_id(customer);
        out.persona = Some(persona);
        if self.rng.random_bool(self.opts.malformed.clamp(0.0, 1.0)) {
            self.malformed(&out.key.clone(), t, &mut out.payload);
            return;
        }
        let (activity, value) = self.pick_activity(customer, persona, phase);
        let segment_format =
            persona != Persona::Bot && self.rng.random_bool(self.opts.segment.clamp(0.0, 1.0));
        if segment_format {
            self.segment_event(&out.key.clone(), activity, value, t, &mut out.payload);
        } else {
            self.native_event(
                &out.key.clone(),
                customer,
                activity,
                value,
                t,
                &mut out.payload,
            );
        }
        if self.opts.duplicates > 0.0 {
            if self.recent.len() == RECENT {
                self.recent.pop_front();
            }
            self.recent
                .push_back((out.key.clone(), out.payload.clone()));
        }
    }

    /// An erasure request: mostly of a known customer, some of customers
    /// never seen, a few malformed.
    fn erasure(&mut self, out: &mut SynthEvent) {
        let n = self.opts.customers.max(1);
        out.persona = None;
        out.erase = true;
        match self.rng.random_range(0..20) {
            0 => {
                out.key = String::new();
                out.payload.extend_from_slice(b"{\"erase\":\"\"}");
            }
            1 => {
                out.key = String::new();
                out.payload.extend_from_slice(b"{\"erase\":42}");
            }
            2 => {
                out.key = format!("gone-{}", self.rng.random_range(0..1000));
                out.payload.extend_from_slice(b"{\"erase\":");
                push_json_str(&mut out.payload, &out.key);
                out.payload.push(b'}');
            }
            _ => {
                out.key = Self::customer_id(self.rng.random_range(0..n));
                out.payload.extend_from_slice(b"{\"erase\":");
                push_json_str(&mut out.payload, &out.key);
                out.payload.push(b'}');
            }
        }
    }

    fn pick_customer(&mut self, phase: f64) -> u64 {
        if let Some((c, left)) = self.burst {
            self.burst = (left > 1).then_some((c, left - 1));
            return c;
        }
        let n = self.opts.customers.max(1);
        loop {
            let c = self.rng.random_range(0..n);
            let persona = Persona::of(c);
            if self
                .rng
                .random_bool(persona.activity(c, phase).clamp(0.0, 1.0))
            {
                if persona == Persona::Bot && self.rng.random_bool(0.05) {
                    self.burst = Some((c, self.rng.random_range(20..200)));
                }
                return c;
            }
        }
    }

    fn pick_activity(
        &mut self,
        customer: u64,
        persona: Persona,
        phase: f64,
    ) -> (&'static str, Option<f64>) {
        let r: f64 = self.rng.random();
        match persona {
            Persona::Bot => ("page_view", None),
            _ if persona.churned(customer, phase) => match r {
                r if r < 0.3 => ("unsubscribe", None),
                r if r < 0.6 => ("support_ticket", None),
                _ => ("nps_response", Some(self.rng.random_range(0..4) as f64)),
            },
            _ => {
                let loyal = persona == Persona::Loyal;
                match r {
                    r if r < 0.34 => ("page_view", None),
                    r if r < 0.44 => ("email_open", None),
                    r if r < 0.50 => ("email_click", None),
                    r if r < 0.58 => ("app_session", None),
                    r if r < 0.65 => ("feature_use", None),
                    r if r < 0.70 => ("social_like", None),
                    r if r < 0.73 => ("social_share", None),
                    r if r < 0.77 => {
                        let v = (self.rng.random_range(500..30_000) as f64) / 100.0;
                        ("purchase", Some(v))
                    }
                    r if r < 0.78 && loyal => ("renewal", None),
                    r if r < 0.79 && loyal => ("upgrade", None),
                    r if r < 0.80 => ("review", None),
                    r if r < 0.81 && loyal => ("referral", None),
                    r if r < 0.83 => ("support_ticket", None),
                    r if r < 0.84 && !loyal && persona != Persona::Steady => ("unsubscribe", None),
                    r if r < 0.86 => {
                        let nps = if loyal {
                            self.rng.random_range(8..=10)
                        } else {
                            self.rng.random_range(3..=9)
                        };
                        ("nps_response", Some(f64::from(nps)))
                    }
                    r if r < 0.87 => ("webinar_attended", None), // not configured
                    _ => ("page_view", None),
                }
            }
        }
    }

    fn channel_of(activity: &str) -> &'static str {
        match activity {
            "page_view" => "web",
            "email_open" | "email_click" | "unsubscribe" => "email",
            "social_like" | "social_share" | "review" | "referral" => "social",
            "app_session" | "feature_use" => "app",
            "purchase" | "renewal" | "upgrade" => "commerce",
            "support_ticket" => "support",
            "nps_response" => "feedback",
            _ => "web",
        }
    }

    fn native_event(
        &mut self,
        id: &str,
        customer: u64,
        activity: &str,
        value: Option<f64>,
        t: Millis,
        out: &mut Vec<u8>,
    ) {
        out.extend_from_slice(b"{\"event_id\":\"e-");
        out.extend_from_slice(itoa::Buffer::new().format(self.seq).as_bytes());
        out.extend_from_slice(b"\",\"customer_id\":");
        push_json_str(out, id);
        out.extend_from_slice(b",\"type\":\"");
        out.extend_from_slice(activity.as_bytes());
        out.extend_from_slice(b"\",\"timestamp\":\"");
        out.extend_from_slice(format_rfc3339(t).as_str().as_bytes());
        out.extend_from_slice(b"\",\"channel\":\"");
        out.extend_from_slice(Self::channel_of(activity).as_bytes());
        out.push(b'"');
        if let Some(v) = value {
            out.extend_from_slice(b",\"value\":");
            out.extend_from_slice(ryu::Buffer::new().format(v).as_bytes());
        }
        out.extend_from_slice(b",\"attributes\":{\"segment\":\"");
        out.extend_from_slice(SEGMENTS[(customer % 4) as usize].as_bytes());
        out.extend_from_slice(b"\",\"page\":\"");
        let page = PAGES[self.rng.random_range(0..PAGES.len())];
        out.extend_from_slice(page.as_bytes());
        out.extend_from_slice(b"\",\"session\":\"s-");
        out.extend_from_slice(itoa::Buffer::new().format(self.seq / 7).as_bytes());
        out.extend_from_slice(b"\"}}");
    }

    fn segment_event(
        &mut self,
        id: &str,
        activity: &str,
        value: Option<f64>,
        t: Millis,
        out: &mut Vec<u8>,
    ) {
        let name = match activity {
            "page_view" => None,
            "purchase" => Some("Order Completed"),
            "email_open" => Some("Email Opened"),
            "email_click" => Some("Email Link Clicked"),
            "app_session" => Some("Application Opened"),
            "unsubscribe" => Some("Unsubscribed"),
            "social_share" => Some("Product Shared"),
            "review" => Some("Product Reviewed"),
            other => Some(other),
        };
        out.extend_from_slice(b"{\"type\":\"");
        out.extend_from_slice(if name.is_some() { b"track" } else { b"page" });
        out.extend_from_slice(b"\",\"userId\":");
        push_json_str(out, id);
        if let Some(n) = name {
            out.extend_from_slice(b",\"event\":");
            push_json_str(out, n);
        }
        out.extend_from_slice(b",\"messageId\":\"m-");
        out.extend_from_slice(itoa::Buffer::new().format(self.seq).as_bytes());
        out.extend_from_slice(b"\",\"timestamp\":\"");
        out.extend_from_slice(format_rfc3339(t).as_str().as_bytes());
        out.extend_from_slice(b"\",\"properties\":{");
        if let Some(v) = value {
            out.extend_from_slice(if activity == "purchase" {
                b"\"revenue\":".as_slice()
            } else {
                b"\"value\":".as_slice()
            });
            out.extend_from_slice(ryu::Buffer::new().format(v).as_bytes());
        }
        out.extend_from_slice(b"},\"context\":{\"library\":{\"name\":\"analytics.js\"}}}");
    }

    fn malformed(&mut self, id: &str, t: Millis, out: &mut Vec<u8>) {
        let ts = format_rfc3339(t);
        let text = match self.rng.random_range(0..6) {
            0 => format!("{{\"customer_id\":\"{id}\",\"type\":\"page_view\",\"timestamp\":"),
            1 => format!("{{\"type\":\"page_view\",\"timestamp\":\"{ts}\"}}"),
            2 => format!("{{\"customer_id\":\"{id}\",\"timestamp\":\"{ts}\"}}"),
            3 => format!("{{\"customer_id\":\"{id}\",\"type\":\"page_view\",\"timestamp\":\"yesterday\"}}"),
            4 => format!(
                "{{\"customer_id\":\"{id}\",\"type\":\"purchase\",\"timestamp\":\"{ts}\",\"value\":-5}}"
            ),
            _ => "[\"not\",\"an\",\"object\"]".to_string(),
        };
        out.extend_from_slice(text.as_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deterministic_for_a_seed_and_mostly_valid() {
        let model = crate::config::Settings::load(std::path::Path::new(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/config/default.toml"
        )))
        .unwrap()
        .model;
        let gen = |seed| {
            let mut s = Synth::new(SynthOptions {
                seed,
                ..SynthOptions::default()
            });
            let mut ev = SynthEvent::default();
            (0..2000)
                .map(|i| {
                    s.next(1_795_132_800_000 + i * 1000, i as f64 / 2000.0, &mut ev);
                    ev.payload.clone()
                })
                .collect::<Vec<_>>()
        };
        let a = gen(7);
        assert_eq!(a, gen(7));
        assert_ne!(a, gen(8));
        let mut valid = 0;
        for p in &a {
            if let crate::event::Parsed::Event(_) =
                crate::event::parse(p, &model, crate::event::ParseContext::default())
            {
                valid += 1;
            }
        }
        assert!(valid > 1900, "{valid} of 2000 valid");
    }
}
