# syntax=docker/dockerfile:1
# The one aimesh image: `aimesh <command>` (all, identity, chat, usage, files, gateway, migrate,
# grant-admin, backup, restore). Built from the workspace root:
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

# ---- PostgreSQL client ----------------------------------------------------------------------
# `aimesh backup` and `restore` run pg_dump and pg_restore, whose major version must be at least
# the servers' (PostgreSQL 17 reads servers 9.2 to 17): PGDG's client, copied with the libraries
# it links to, except glibc's own (the runtime image has the same glibc, Debian 12), each under
# its directory's real path (/lib is a link to /usr/lib there) by its soname.
FROM debian:bookworm-slim AS pgclient
ARG PG_MAJOR=17
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates curl \
    && install -d /usr/share/postgresql-common/pgdg \
    && curl -fsSL -o /usr/share/postgresql-common/pgdg/apt.postgresql.org.asc \
        https://www.postgresql.org/media/keys/ACCC4CF8.asc \
    && echo "deb [signed-by=/usr/share/postgresql-common/pgdg/apt.postgresql.org.asc] https://apt.postgresql.org/pub/repos/apt bookworm-pgdg main" \
        > /etc/apt/sources.list.d/pgdg.list \
    && apt-get update \
    && apt-get install -y --no-install-recommends "postgresql-client-${PG_MAJOR}" \
    && mkdir -p /out/root \
    && cp --parents "/usr/lib/postgresql/${PG_MAJOR}/bin/pg_dump" "/usr/lib/postgresql/${PG_MAJOR}/bin/pg_restore" /out/root/ \
    && for lib in $(ldd "/usr/lib/postgresql/${PG_MAJOR}/bin/pg_dump" "/usr/lib/postgresql/${PG_MAJOR}/bin/pg_restore" \
            | awk '/=> \//{print $3}' | sort -u \
            | grep -Ev '/(libc|libm|libdl|libpthread|librt|libgcc_s)\.so'); do \
        dir=$(readlink -f "$(dirname "$lib")"); mkdir -p "/out/root$dir"; cp -L "$lib" "/out/root$dir/"; \
    done \
    && ln -s "${PG_MAJOR}" /out/root/usr/lib/postgresql/current

# ---- runtime --------------------------------------------------------------------------------
# glibc, libgcc and CA certificates, no shell, no package manager; runs as nonroot (65532).
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /out/aimesh /usr/local/bin/aimesh
COPY --from=pgclient /out/root/ /
# Where `aimesh backup` and `restore` find pg_dump and pg_restore (their --pg-bin).
ENV AIMESH_PG_BIN=/usr/lib/postgresql/current/bin
USER 65532:65532
# gRPC identity, chat, usage, files, analytics; HTTP gateway; Prometheus /metrics.
EXPOSE 7101 7102 7103 7104 7105 8080 7190
ENTRYPOINT ["/usr/local/bin/aimesh"]
CMD ["all"]
