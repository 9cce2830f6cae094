//! Producing with a full queue: the one retry loop of the tests and the
//! benchmarks (which include this file too).

use std::time::Duration;

use rdkafka::producer::{BaseRecord, ThreadedProducer};

/// Sends a record, waiting while the producer's queue is full; any other
/// error fails the test or the benchmark.
pub fn send_waiting<K, P, C>(
    producer: &ThreadedProducer<C>,
    mut record: BaseRecord<'_, K, P, C::DeliveryOpaque>,
) where
    K: rdkafka::message::ToBytes + ?Sized,
    P: rdkafka::message::ToBytes + ?Sized,
    C: rdkafka::producer::ProducerContext,
{
    loop {
        match producer.send(record) {
            Ok(()) => return,
            Err((e, back)) => {
                assert!(
                    e.rdkafka_error_code() == Some(rdkafka::types::RDKafkaErrorCode::QueueFull),
                    "cannot produce: {e}"
                );
                std::thread::sleep(Duration::from_millis(1));
                record = back;
            }
        }
    }
}
