# Container images for users with Docker (CI builds the same images offline with
# scripts/k8s/image.sh, without Docker or a registry).
#   docker build --target kord -t kord:0.1.0 .                    # kord + kordctl
#   docker build --target kord-operator -t kord-operator:0.1.0 .  # the operator
# Then load them into kind: kind load docker-image kord:0.1.0 kord-operator:0.1.0

FROM rust:1.88-bookworm AS build
# RocksDB is C++ and its bindings come from bindgen (libclang); protoc is vendored by a crate.
RUN apt-get update && apt-get install -y --no-install-recommends clang libclang-dev \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --locked --release --bin kord --bin kordctl --bin kord-operator \
    && mkdir -p /out \
    && cp target/release/kord target/release/kordctl target/release/kord-operator /out/

FROM debian:bookworm-slim AS runtime
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 65532 --home-dir /var/lib/kord --create-home kord
USER 65532

FROM runtime AS kord-operator
COPY --from=build /out/kord-operator /usr/local/bin/kord-operator
ENTRYPOINT ["/usr/local/bin/kord-operator"]

FROM runtime AS kord
COPY --from=build /out/kord /out/kordctl /usr/local/bin/
VOLUME /var/lib/kord
EXPOSE 7379 7380 7381
ENTRYPOINT ["/usr/local/bin/kord"]
