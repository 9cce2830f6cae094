#!/usr/bin/env python3
"""An independent, deliberately naive implementation of shared/spec/scoring.md.

It keeps every accepted event and recomputes each decayed sum from scratch
(f64, no reference times, no compact storage), so it shares no arithmetic
with the Rust engine. `tests/reference.rs` runs both on generated streams and
compares the outputs to 0.01 score points. It follows v2 of the spec:
de-duplication by event id (raw ids, not hashes), erasure requests, tier
hysteresis and forgetting idle customers.

Usage: reference_replay.py CONFIG.toml INPUT.jsonl > OUTPUT.jsonl
Dead letters go to stderr as JSONL.
"""
import json
import math
import re
import sys
import tomllib
from datetime import datetime, timezone

DAY = 86_400_000
UNITS = {"ms": 1, "s": 1000, "m": 60_000, "h": 3_600_000, "d": DAY, "w": 7 * DAY}


def duration(text):
    total = 0
    for num, unit in re.findall(r"(\d+)\s*([a-z]+)", text):
        unit = {"sec": "s", "min": "m", "hour": "h", "day": "d", "days": "d", "hours": "h"}.get(unit, unit)
        total += int(num) * UNITS[unit]
    return total


RFC3339 = re.compile(
    r"^(\d{4})-(\d{2})-(\d{2})[Tt ](\d{2}):(\d{2}):(\d{2})(\.\d+)?([Zz]|[+-]\d{2}:\d{2})$"
)


def parse_rfc3339(s):
    m = RFC3339.match(s)
    if not m:
        return None
    y, mo, d, h, mi, sec, frac, off = m.groups()
    try:
        dt = datetime(int(y), int(mo), int(d), int(h), int(mi), int(sec), tzinfo=timezone.utc)
    except ValueError:
        return None
    ms = int(dt.timestamp()) * 1000
    if frac:
        ms += int((frac[1:] + "000")[:3])
    if off not in ("Z", "z"):
        sign = 1 if off[0] == "+" else -1
        ms -= sign * (int(off[1:3]) * 3600 + int(off[4:6]) * 60) * 1000
    return ms


def fmt_time(ms):
    dt = datetime.fromtimestamp(ms // 1000, tz=timezone.utc)
    return dt.strftime("%Y-%m-%dT%H:%M:%S") + ".%03dZ" % (ms % 1000)


class Model:
    def __init__(self, cfg):
        sc = cfg["scoring"]
        self.half_life = duration(sc.get("half_life", "14d"))
        norm = sc.get("normalization", {})
        self.norm_kind = norm.get("kind", "saturating")
        self.half_score_at = norm.get("half_score_at", 40.0)
        self.norm_max = norm.get("max", 100.0)
        self.activities = []
        for name, a in sc["activities"].items():
            self.activities.append(
                dict(name=name, weight=a.get("weight", 0.0), value_weight=a.get("value_weight", 0.0),
                     cap=a.get("cap"), channel=a.get("channel", "default"))
            )
        self.index = {a["name"]: i for i, a in enumerate(self.activities)}
        self.channels = sorted({a["channel"] for a in self.activities})
        div = sc.get("diversity")
        self.diversity = None if div is None else dict(
            window=duration(div.get("window", "30d")),
            bonus=div.get("bonus_per_channel", 0.1),
            max=div.get("max_channels", 4))
        tiers = cfg.get("tiers") or [
            {"name": "very_disengaged"}, {"name": "somewhat_engaged", "above": 40.0},
            {"name": "very_engaged", "above": 75.0}]
        self.tiers = tiers
        sig = cfg.get("signals", {})
        self.sweep = duration(sig.get("sweep_interval", "1h"))
        self.min_delta = sig.get("min_delta", 5.0)
        ch = sig.get("churn", {})
        self.lookback = duration(ch.get("lookback", "30d"))
        self.min_peak = ch.get("min_peak", 40.0)
        self.drop_ratio = ch.get("drop_ratio", 0.4)
        self.inactivity = duration(ch.get("inactivity", "14d"))
        inp = cfg.get("input", {})
        self.format = inp.get("format", "auto")
        self.max_bytes = inp.get("max_event_bytes", 65536)
        self.max_lateness = duration(inp.get("max_lateness", "30d"))
        self.segment_events = inp.get("segment_events", {})
        self.dedup_depth = inp.get("dedup_depth", 4)
        self.hysteresis = sig.get("tier_hysteresis", 0.0)
        self.forget_after = duration(sc["forget_after"]) if "forget_after" in sc else None

    def tier(self, s):
        t = 0
        for i, tier in enumerate(self.tiers[1:], 1):
            if tier["above"] < s:
                t = i
        return t

    def tier_from(self, s, current):
        """Section 5 step 1: the tier with hysteresis around `current`."""
        up = self.tier(s - self.hysteresis)
        down = self.tier(s + self.hysteresis)
        if up > current:
            return up
        if down < current:
            return down
        return current


class Invalid(Exception):
    def __init__(self, reason):
        self.reason = reason


def reject_constant(c):
    raise ValueError("not JSON: " + c)


def parse(line, model):
    if len(line) > model.max_bytes:
        raise Invalid("too_large")
    try:
        obj = json.loads(line.decode("utf-8"), parse_constant=reject_constant)
    except (ValueError, UnicodeDecodeError):
        raise Invalid("invalid_json")
    if not isinstance(obj, dict):
        raise Invalid("not_an_object")
    if "erase" in obj:
        cid = obj["erase"]
        if not isinstance(cid, str) or not (1 <= len(cid.encode()) <= 256):
            raise Invalid("invalid_customer_id")
        return ("erase", cid)
    fmt = model.format
    if fmt == "auto":
        if "customer_id" in obj:
            fmt = "native"
        elif "userId" in obj or "anonymousId" in obj:
            fmt = "segment"
        else:
            raise Invalid("missing_customer_id")
    if fmt == "native":
        cid = obj.get("customer_id")
    else:
        uid = obj.get("userId")
        cid = uid if isinstance(uid, str) and uid != "" else obj.get("anonymousId")
    if cid is None:
        raise Invalid("missing_customer_id")
    if not isinstance(cid, str) or not (1 <= len(cid.encode()) <= 256):
        raise Invalid("invalid_customer_id")
    if fmt == "native":
        kind = obj.get("type")
        if not isinstance(kind, str):
            raise Invalid("missing_type")
        activity = kind
    else:
        kind = obj.get("type")
        if kind == "track":
            activity = obj.get("event")
            if not isinstance(activity, str):
                raise Invalid("missing_type")
            activity = model.segment_events.get(activity, activity)
        elif kind == "page":
            activity = "page_view"
        elif kind == "screen":
            activity = "screen_view"
        elif kind in ("identify", "group", "alias"):
            return "not_an_activity"
        else:
            raise Invalid("missing_type")
    ts = obj.get("timestamp")
    if isinstance(ts, str):
        t = parse_rfc3339(ts)
    elif isinstance(ts, int) and not isinstance(ts, bool):
        t = ts
    else:
        t = None
    if t is None:
        raise Invalid("invalid_timestamp")
    if fmt == "native":
        value = obj.get("value")
    else:
        props = obj.get("properties") if isinstance(obj.get("properties"), dict) else {}
        value = props.get("revenue")
        if value is None:
            value = props.get("value")
    if value is None:
        value = 0.0
    elif (isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)
          or value < 0 or value > 1e12):
        raise Invalid("invalid_value")
    if activity not in model.index:
        return "unknown_activity"
    channel = obj.get("channel") if fmt == "native" else None
    event_id = obj.get("event_id") if fmt == "native" else obj.get("messageId")
    return dict(customer=cid, k=model.index[activity], t=t, value=float(value),
                channel=channel if channel in model.channels else None,
                event_id=event_id if isinstance(event_id, str) else None)


class Customer:
    def __init__(self, first_clock):
        self.events = []  # (k, t, points, channel)
        self.emitted = 0.0
        self.emitted_tier = 0
        self.peak = 0.0
        self.peak_at = first_clock
        self.ever = False
        self.at_risk = False
        self.last = None
        self.ids = []  # remembered event ids, newest first


def r2(x):
    # Half away from zero, like Rust's f64::round.
    return math.copysign(math.floor(abs(x) * 100 + 0.5) / 100, x)


def evaluate(model, cid, c, T, cause, event_id, out):
    sums = [0.0] * len(model.activities)
    chan_last = {}
    for k, t, points, channel in c.events:
        sums[k] += points * 2 ** (-(T - t) / model.half_life)
        if points > 0:
            chan_last[channel] = max(chan_last.get(channel, t), t)
    contrib = [min(s, a["cap"]) if a["cap"] is not None else s for s, a in zip(sums, model.activities)]
    D = 1.0
    if model.diversity:
        n = sum(1 for t in chan_last.values() if T - t <= model.diversity["window"])
        if n >= 1:
            D = 1 + model.diversity["bonus"] * (min(n, model.diversity["max"]) - 1)
    R = max(0.0, sum(contrib)) * D
    if model.norm_kind == "saturating":
        s = 100 * (1 - 2 ** (-R / model.half_score_at))
    else:
        s = min(100.0, 100 * R / model.norm_max)
    s = min(100.0, max(0.0, s))
    tier = model.tier_from(s, c.emitted_tier)
    if s >= c.peak or T - c.peak_at > model.lookback:
        c.peak, c.peak_at = s, T
    if tier > 0:
        c.ever = True
    name = lambda i: model.tiers[i]["name"]
    if abs(s - c.emitted) >= model.min_delta or tier != c.emitted_tier:
        o = {"schema": "ces.v1", "kind": "score_changed", "customer_id": cid, "at": fmt_time(T),
             "score": r2(s), "previous_score": r2(c.emitted), "tier": name(tier),
             "previous_tier": name(c.emitted_tier), "cause": cause}
        if event_id is not None:
            o["event_id"] = event_id
        o["contributions"] = {a["name"]: r2(v) for a, v in zip(model.activities, contrib) if abs(v) >= 0.005}
        out.append(o)
        c.emitted, c.emitted_tier = s, tier
    reasons = []
    if c.peak >= model.min_peak and s <= c.peak * (1 - model.drop_ratio):
        reasons.append("score_drop")
    if c.ever and T - c.last >= model.inactivity:
        reasons.append("inactive")
    if c.ever and tier == 0:
        reasons.append("lowest_tier")
    if not c.at_risk and reasons:
        out.append({"schema": "ces.v1", "kind": "churn_risk", "customer_id": cid, "at": fmt_time(T),
                    "score": r2(s), "peak_score": r2(c.peak), "tier": name(tier),
                    "level": "high" if tier == 0 else "medium", "reasons": reasons,
                    "last_event_at": fmt_time(c.last)})
        c.at_risk = True
    elif c.at_risk and not reasons:
        out.append({"schema": "ces.v1", "kind": "churn_risk_cleared", "customer_id": cid,
                    "at": fmt_time(T), "score": r2(s), "tier": name(tier)})
        c.at_risk = False


W = None  # the watermark


def accept(model, customers, e, out):
    """Section 4 for one valid event: too_late, duplicate, sweep, apply."""
    global W
    if W is not None and e["t"] < W - model.max_lateness:
        return
    c = customers.get(e["customer"])
    if model.dedup_depth > 0 and e["event_id"] is not None and c is not None and e["event_id"] in c.ids:
        return
    W2 = e["t"] if W is None else max(W, e["t"])
    if W is not None and W2 // model.sweep > W // model.sweep:
        T = (W2 // model.sweep) * model.sweep
        for cid, cust in customers.items():
            evaluate(model, cid, cust, T, "decay", None, out)
        if model.forget_after is not None:
            for cid in [cid for cid, cust in customers.items() if T - cust.last >= model.forget_after]:
                del customers[cid]
    W = W2
    c = customers.get(e["customer"])
    if c is None:
        c = customers[e["customer"]] = Customer(W)
    a = model.activities[e["k"]]
    points = a["weight"] + a["value_weight"] * e["value"]
    channel = e["channel"] or a["channel"]
    c.events.append((e["k"], e["t"], points, channel))
    c.last = e["t"] if c.last is None else max(c.last, e["t"])
    if e["event_id"] is not None and model.dedup_depth > 0:
        c.ids = ([e["event_id"]] + c.ids)[: model.dedup_depth]
    evaluate(model, e["customer"], c, W, "event", e["event_id"], out)


def main():
    with open(sys.argv[1], "rb") as f:
        model = Model(tomllib.load(f))
    customers = {}
    out = []
    with open(sys.argv[2], "rb") as f:
        for n, raw in enumerate(f, 1):
            line = raw[:-1] if raw.endswith(b"\n") else raw
            if line.strip(b" \t\r") == b"":
                continue
            try:
                e = parse(line, model)
            except Invalid as inv:
                sys.stderr.write(json.dumps({"line": n, "reason": inv.reason}) + "\n")
                continue
            if isinstance(e, str):
                continue
            if isinstance(e, tuple):  # an erasure request: at T = W
                if customers.pop(e[1], None) is not None:
                    out.append({"schema": "ces.v1", "kind": "customer_erased",
                                "customer_id": e[1], "at": fmt_time(W)})
            else:
                accept(model, customers, e, out)
            for o in out:
                sys.stdout.write(json.dumps(o, separators=(",", ":")) + "\n")
            out.clear()


if __name__ == "__main__":
    main()
