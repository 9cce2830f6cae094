use super::*;

fn layout() -> Layout {
    let settings = crate::config::Settings::from_toml(
            "[scoring.activities]\na = { weight = 1.0 }\nb = { weight = 2.0 }\n[input]\ndedup_depth = 2\n",
            std::path::Path::new("t.toml"),
        )
        .unwrap();
    Layout::for_model(&settings.model)
}

/// Every customer's id and record words, sorted by id.
fn contents(t: &CustomerTable) -> Vec<(String, Vec<u32>)> {
    let mut v: Vec<_> = (0..t.len() as Slot)
        .map(|s| (t.id(s).to_string(), t.record(s).w[4..].to_vec()))
        .collect();
    v.sort();
    v
}

fn id(i: u64) -> String {
    // Short ids live in the record, long ones in the arena.
    if i % 3 == 0 {
        format!("a-rather-long-customer-id-{i}")
    } else {
        format!("c{i}")
    }
}

#[test]
fn channels_within_counts_what_channel_time_says() {
    // Narrow (u32 ages) and wide (absolute times) channel storage.
    for window in ["30d", "60d"] {
        let settings = crate::config::Settings::from_toml(
                &format!(
                    "[scoring.activities]\na = {{ weight = 1.0, channel = \"web\" }}\n\
                     b = {{ weight = 1.0, channel = \"app\" }}\nc = {{ weight = 1.0, channel = \"email\" }}\n\
                     [scoring.diversity]\nwindow = \"{window}\"\nbonus_per_channel = 0.1\nmax_channels = 3\n"
                ),
                std::path::Path::new("t.toml"),
            )
            .unwrap();
        let layout = Layout::for_model(&settings.model);
        let w = settings.model.diversity.unwrap().window;
        let mut t = CustomerTable::new(layout);
        let day = 86_400_000;
        let (slot, _) = t
            .find_or_insert("c", || NewCustomer {
                last_event_at: 100 * day,
                peak_at: 0,
            })
            .unwrap();
        let mut r = t.record_mut(slot);
        r.touch_channel(0, 100 * day);
        r.touch_channel(1, 100 * day - 10 * day);
        // Channel 2 never touched.
        for dt in [
            0,
            1,
            10 * day,
            20 * day,
            w - 10 * day,
            w - 1,
            w,
            w + 1,
            2 * w,
            -5,
        ] {
            let at = 100 * day + dt;
            let expected = (0..3)
                .filter(|&c| r.channel_time(c).is_some_and(|tc| at - tc <= w))
                .count() as u32;
            assert_eq!(
                r.channels_within(at, w),
                expected,
                "window {window}, dt {dt}"
            );
        }
    }
}

#[test]
fn ids_of_every_length_are_found_exactly() {
    // Around the inline limit (12 bytes), with NUL bytes and ids that
    // are prefixes or zero-padded versions of each other: a lookup
    // finds exactly the id inserted, byte for byte.
    let mut ids: Vec<String> = Vec::new();
    for len in 1..=16 {
        let base: String = "abcdefghijklmnop"[..len].to_string();
        ids.push(base.clone());
        ids.push(format!("{}\0", &base[..len - 1]));
        ids.push(format!("\0{}", &base[1..]));
        ids.push(format!("{}é", &base[..len - 1]));
    }
    ids.sort();
    ids.dedup();
    let mut t = CustomerTable::new(layout());
    for (i, id) in ids.iter().enumerate() {
        assert_eq!(t.find(id), None, "{id:?} before insertion");
        let (slot, new) = t
            .find_or_insert(id, || NewCustomer {
                last_event_at: i as i64,
                peak_at: 0,
            })
            .unwrap();
        assert!(new, "{id:?}");
        assert_eq!(slot as usize, i);
    }
    for (i, id) in ids.iter().enumerate() {
        let slot = t.find(id).unwrap();
        assert_eq!(t.id(slot), id);
        assert_eq!(t.record(slot).last_event_at(), i as i64);
        let hash = t.hash_id(id);
        assert_eq!(t.find_hashed(hash, id), Some(slot));
    }
    assert_eq!(t.find("abcdefghijklmnopq"), None);
    assert_eq!(t.find("\0\0"), None);
    assert_eq!(t.find("b"), None);
}

#[test]
fn removal_keeps_the_index_and_the_other_records() {
    let mut t = CustomerTable::new(layout());
    for i in 0..100 {
        let (slot, _) = t
            .find_or_insert(&id(i), || NewCustomer {
                last_event_at: i as i64,
                peak_at: 0,
            })
            .unwrap();
        t.record_mut(slot).set_sum(0, i as f64);
        t.record_mut(slot).remember(i + 1);
    }
    for i in (0..100).step_by(3) {
        let slot = t.find(&id(i)).unwrap();
        t.remove(slot);
    }
    assert_eq!(t.len(), 66);
    for i in 0..100 {
        match t.find(&id(i)) {
            Some(slot) => {
                assert!(i % 3 != 0);
                assert_eq!(t.id(slot), id(i));
                let r = t.record(slot);
                assert_eq!(r.last_event_at(), i as i64);
                assert_eq!(r.sum(0), i as f32);
                assert!(r.remembers(i + 1) && !r.remembers(i + 2));
            }
            None => assert_eq!(i % 3, 0),
        }
    }
    // Removed customers come back as new ones.
    let (_, new) = t
        .find_or_insert(&id(0), || NewCustomer {
            last_event_at: 7,
            peak_at: 7,
        })
        .unwrap();
    assert!(new);
}

#[test]
fn a_snapshot_sees_the_table_as_it_began_whatever_is_removed_or_added() {
    // Interleave snapshot chunks with removals, insertions and writes:
    // the copy must equal the table at the start.
    let mut t = CustomerTable::new(layout());
    let mut next = 0u64;
    let mut rng = 0x2545_f491_4f6c_dd1du64;
    let mut rand = move |n: u64| {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng % n
    };
    for _ in 0..300 {
        let (slot, _) = t
            .find_or_insert(&id(next), || NewCustomer {
                last_event_at: next as i64,
                peak_at: 0,
            })
            .unwrap();
        t.record_mut(slot).set_sum(1, next as f64);
        next += 1;
    }
    for round in 0..5 {
        let before = contents(&t);
        t.begin_snapshot();
        let mut copied = Vec::new();
        loop {
            for _ in 0..rand(20) {
                match rand(3) {
                    0 if t.len() > 1 => t.remove(rand(t.len() as u64) as Slot),
                    1 => {
                        let (slot, _) = t
                            .find_or_insert(&id(next), || NewCustomer {
                                last_event_at: next as i64,
                                peak_at: 0,
                            })
                            .unwrap();
                        t.record_mut(slot).set_sum(0, 1.0);
                        next += 1;
                    }
                    _ => {
                        let slot = rand(t.len() as u64) as Slot;
                        t.record_mut(slot).set_sum(0, round as f64 + 2.0);
                    }
                }
            }
            if t.snapshot_chunk(7, &mut copied) {
                break;
            }
        }
        let ids = t.finish_snapshot();
        let copy = CustomerTable::from_parts(*t.layout(), copied, ids).unwrap();
        assert_eq!(contents(&copy), before, "round {round}");
    }
}
