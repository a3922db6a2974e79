# Build: the release binary, with the protos compiled by protox (no protoc needed).
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked --bin user-rpc

# Run: a slim image with the binary only; migrations are embedded in it.
FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* && useradd --system --uid 10001 user-rpc
COPY --from=build /src/target/release/user-rpc /usr/local/bin/user-rpc
USER user-rpc
ENV USER_RPC_LISTEN=0.0.0.0:50051
EXPOSE 50051
ENTRYPOINT ["user-rpc"]
CMD ["serve"]
