# The service image that helm/lineguard deploys. CPU libtorch by default; for GPU nodes build with
#   docker build --build-arg LINEGUARD_TORCH=cuda -t lineguard:cuda .
# NOTE: written for the chart but not built here (no Docker on the development machines).
FROM rust:1.95-bookworm AS build
RUN apt-get update && apt-get install -y --no-install-recommends python3-pip && rm -rf /var/lib/apt/lists/*
ARG LINEGUARD_TORCH=cpu
WORKDIR /opt/lineguard
COPY . .
# libtorch from the PyPI wheel into .libtorch/; the test broker and the distillation backbone stay out.
RUN LINEGUARD_TORCH=${LINEGUARD_TORCH} scripts/setup.sh libtorch \
    && cargo build --release --locked \
    && strip target/release/lineguard

FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates && rm -rf /var/lib/apt/lists/*
# build.rs baked /opt/lineguard/.libtorch/... into the binary's rpath: keep the same paths.
COPY --from=build /opt/lineguard/.libtorch/torch/lib /opt/lineguard/.libtorch/torch/lib
COPY --from=build /opt/lineguard/.libtorch/nvidia /opt/lineguard/.libtorch/nvidia
COPY --from=build /opt/lineguard/target/release/lineguard /usr/local/bin/lineguard
COPY pipelines /etc/lineguard/examples
USER 10001:10001
ENTRYPOINT ["lineguard"]
CMD ["--help"]
