# segs in a container: a builder stage compiles the binary and the four rule
# plugins, a slim runtime stage runs them as a non-root user.
#
#   docker build -t segs .
#   docker run --rm -p 8080:8080 -v segs-data:/var/lib/segs segs
#
# The image holds the shipped pipeline.toml (the embedded default: journal
# and SQLite in /var/lib/segs) and the plugins it names, laid out as in the
# repository: /opt/segs/pipeline.toml, /opt/segs/target/plugins/*.wasm.
# docker-compose.yml runs it on Kafka, Redis and TimescaleDB instead.
# host/tests/container.rs checks these steps against a local build.

FROM rust:1-bookworm AS builder
WORKDIR /src
RUN rustup target add wasm32-wasip2
COPY . .
# The four guests to target/plugins/*.wasm (xtask/src/main.rs), then the host.
RUN cargo xtask build-plugins
RUN cargo build --release --locked -p segs

FROM debian:bookworm-slim
# The binary links only glibc, libgcc_s and zlib (librdkafka is built into
# it without SSL/SASL), all in the base image; curl is for the HEALTHCHECK.
RUN apt-get update \
    && apt-get install -y --no-install-recommends curl \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --user-group --uid 10001 --home-dir /var/lib/segs --shell /usr/sbin/nologin segs \
    && mkdir -p /var/lib/segs /opt/segs/target/plugins \
    && chown segs:segs /var/lib/segs
COPY --from=builder /src/target/release/segs /usr/local/bin/segs
COPY --from=builder /src/target/plugins/anomaly.wasm /src/target/plugins/overload.wasm /src/target/plugins/tariff.wasm /src/target/plugins/aggregate.wasm /opt/segs/target/plugins/
COPY pipeline.toml /opt/segs/pipeline.toml

# Relative paths in a pipeline file resolve from its folder: the plugins are
# found at /opt/segs/target/plugins. To swap them, mount a folder with the
# four components there (`-v "$PWD/my-plugins:/opt/segs/target/plugins:ro"`)
# or point a config of your own elsewhere. It is deliberately not a VOLUME:
# an image-populated volume outlives the image, and a rebuilt image's
# plugins would stay hidden behind the old ones on container re-creation.
# /var/lib/segs holds the embedded bus journal and the SQLite store.
VOLUME ["/var/lib/segs"]
ENV SEGS_CONFIG=/opt/segs/pipeline.toml \
    SEGS_LISTEN=0.0.0.0:8080 \
    SEGS_BUS_PATH=/var/lib/segs/segs-bus.db \
    DATABASE_URL=sqlite:///var/lib/segs/segs.db
WORKDIR /var/lib/segs
USER segs:segs
EXPOSE 8080
HEALTHCHECK --interval=10s --timeout=3s --start-period=30s --retries=3 \
    CMD curl -fsS http://127.0.0.1:8080/healthz > /dev/null || exit 1
ENTRYPOINT ["segs"]
CMD ["run", "--no-simulator"]
