FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked

FROM debian:bookworm-slim
COPY --from=build /src/target/release/pgfleet /usr/local/bin/pgfleet
# Listens on 0.0.0.0:6432 (config/pgfleet.toml is for a local run on 127.0.0.1).
COPY docker/pgfleet.toml /etc/pgfleet/pgfleet.toml
EXPOSE 6432 9930
USER nobody
CMD ["pgfleet", "--config", "/etc/pgfleet/pgfleet.toml"]
