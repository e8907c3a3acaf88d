FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked

FROM debian:bookworm-slim
COPY --from=build /src/target/release/pgfleet /usr/local/bin/pgfleet
COPY config/pgfleet.toml /etc/pgfleet/pgfleet.toml
EXPOSE 6432 9930
USER nobody
CMD ["pgfleet", "--config", "/etc/pgfleet/pgfleet.toml"]
