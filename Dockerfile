# kasagi-relay image: the wheel built by maturin in a build stage, installed in a slim runtime.
#   docker build -t kasagi-relay .        (docker-compose.yml does this for `make up`)

# ---- build: Rust + maturin -> one abi3 wheel (CPython >= 3.11) -------------------------------
FROM python:3.11-slim-bookworm AS build
RUN apt-get update \
    && apt-get install -y --no-install-recommends curl ca-certificates build-essential \
    && rm -rf /var/lib/apt/lists/*
# Cargo.toml asks for rust-version 1.85; rustup's minimal profile gives the current stable.
ENV RUSTUP_HOME=/opt/rustup CARGO_HOME=/opt/cargo PATH=/opt/cargo/bin:$PATH
RUN curl -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal --default-toolchain stable
RUN pip install --no-cache-dir "maturin>=1.16,<2"
WORKDIR /src
COPY pyproject.toml Cargo.toml Cargo.lock README.md ./
COPY rust ./rust
COPY kasagi_relay ./kasagi_relay
RUN maturin build --release --locked --out /wheels

# ---- runtime: the wheel and its dependencies, no compiler ------------------------------------
FROM python:3.11-slim-bookworm AS runtime
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir /wheels/*.whl && rm -rf /wheels \
    && useradd --system --uid 10001 --no-create-home kasagi
USER kasagi
EXPOSE 8765
# /healthz answers 200 only while the backend (Redis through Sentinel) is reachable.
HEALTHCHECK --interval=5s --timeout=3s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request as u; sys.exit(0 if u.urlopen('http://127.0.0.1:8765/healthz', timeout=2).status == 200 else 1)"]
ENTRYPOINT ["kasagi-relay"]
CMD ["--host", "0.0.0.0", "--port", "8765"]
