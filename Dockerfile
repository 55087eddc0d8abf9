# Multi-stage build of the operator image.
#   docker build -t integration-operator:0.1.0 .
# Not built by `make test` (the development machines have no container
# engine), but `hack/check-docker-context` compiles exactly what the COPY
# lines bring in. Keep it in step with Cargo.toml's rust-version.
FROM rust:1.95-slim-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock build.rs ./
COPY src ./src
# Embedded by sqlx::migrate! at compile time.
COPY migrations ./migrations
RUN cargo build --release --locked --bin integration-operator \
    && strip target/release/integration-operator

FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /src/target/release/integration-operator /usr/local/bin/integration-operator
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/integration-operator"]
CMD ["run"]
