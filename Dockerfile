# syntax=docker/dockerfile:1
# The one aimesh image: `aimesh <command>` (all, identity, chat, usage, files, gateway, migrate,
# grant-admin). Built from the workspace root:
#   docker build -t aimesh:dev .
# Not built by `make test` (the development machines have no container engine); the Helm chart
# and k8s/ run it as uid 65532 with a read-only root filesystem.

# ---- build ----------------------------------------------------------------------------------
FROM rust:1.95-bookworm AS build
# protoc and the well-known types for the proto crate; cmake for aws-lc-sys (rustls' crypto).
RUN apt-get update \
    && apt-get install -y --no-install-recommends protobuf-compiler libprotobuf-dev cmake \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p aimesh \
    && install -D -m 755 target/release/aimesh /out/aimesh

# ---- runtime --------------------------------------------------------------------------------
# glibc, libgcc and CA certificates, no shell, no package manager; runs as nonroot (65532).
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /out/aimesh /usr/local/bin/aimesh
USER 65532:65532
# gRPC identity, chat, usage, files, analytics; HTTP gateway; Prometheus /metrics.
EXPOSE 7101 7102 7103 7104 7105 8080 7190
ENTRYPOINT ["/usr/local/bin/aimesh"]
CMD ["all"]
