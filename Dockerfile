# syntax=docker/dockerfile:1
# Switchboard images: one build stage, one small runtime stage per binary.
#   docker build --target edge   -t switchboard-edge:0.1.0 .
#   docker build --target router -t switchboard-router:0.1.0 .
# The runtime is distroless (glibc and libgcc, which is all the binaries
# link: no shell, no package manager) and runs as uid 65532 (nonroot).

ARG RUST_VERSION=1.95
# The builder's Debian (bookworm, glibc 2.36) must match the runtime's
# (distroless debian12): move both together.

FROM rust:${RUST_VERSION}-slim-bookworm AS build
WORKDIR /src
COPY . .
# BuildKit caches keep the crate registry and target/ between builds.
# protox compiles the .proto files in build.rs: no protoc in the image.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p switchboard-edge -p switchboard-router-server -p switchboard-node \
    && mkdir /out \
    && cp target/release/switchboard-edge target/release/switchboard-router target/release/switchboard-ctl /out/

FROM gcr.io/distroless/cc-debian12:nonroot AS router
COPY --from=build /out/switchboard-router /usr/local/bin/switchboard-router
# The operator's CLI: `kubectl exec deploy/<release>-router -- switchboard-ctl edges`
# reaches this router on its default URL with the pod's SWITCHBOARD_ADMIN_KEY.
COPY --from=build /out/switchboard-ctl /usr/local/bin/switchboard-ctl
USER 65532:65532
ENV SWITCHBOARD_ROUTER_LISTEN=0.0.0.0:8090
EXPOSE 8090
ENTRYPOINT ["/usr/local/bin/switchboard-router"]

# Last, so a plain `docker build .` gives the edge.
FROM gcr.io/distroless/cc-debian12:nonroot AS edge
COPY --from=build /out/switchboard-edge /usr/local/bin/switchboard-edge
USER 65532:65532
ENV SWITCHBOARD_LISTEN=0.0.0.0:8080
EXPOSE 8080
ENTRYPOINT ["/usr/local/bin/switchboard-edge"]
