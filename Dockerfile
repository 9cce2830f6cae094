# ces-stream: a multi-stage build. The build stage runs the same command CI
# uses (`cargo build --release --locked`), librdkafka included (built from
# its bundled source); the runtime image holds the binary, the default model
# and nothing else.
FROM rust:1.95-bookworm AS build
RUN apt-get update \
 && apt-get install -y --no-install-recommends build-essential perl python3 libssl-dev pkg-config \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src src
COPY benches benches
COPY examples examples
COPY config config
RUN cargo build --release --locked --bin ces-stream

FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates libssl3 curl \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --home-dir /var/lib/ces-stream --shell /usr/sbin/nologin ces \
 && mkdir -p /var/lib/ces-stream /etc/ces-stream \
 && chown ces /var/lib/ces-stream
COPY --from=build /src/target/release/ces-stream /usr/local/bin/ces-stream
COPY config/default.toml /etc/ces-stream/config.toml
USER ces
# Snapshots go to the volume; Kafka comes from CES_KAFKA_* or a mounted config.
ENV CES_SNAPSHOT_DIR=/var/lib/ces-stream
VOLUME /var/lib/ces-stream
EXPOSE 9464
HEALTHCHECK --interval=15s --timeout=3s --start-period=10s \
  CMD curl -fsS http://127.0.0.1:9464/healthz || exit 1
ENTRYPOINT ["ces-stream"]
CMD ["run", "--config", "/etc/ces-stream/config.toml", "--log-format", "json"]
