# syntax=docker/dockerfile:1
#
# The comfyfleet binary, static, in a small image that runs as a non-root user.
#
#   docker build -t comfyfleet .
#   docker run --rm -p 8080:8080 comfyfleet              # `up`: the whole fleet, simulated nodes
#   docker run --rm comfyfleet dispatcher --nats nats://…   # or any one service (see docker-compose.yml)
#
# The image's entry point is the binary: every command and flag of `comfyfleet` works,
# and every flag has its COMFYFLEET_* environment variable. Health checks use the
# binary too (`comfyfleet healthcheck --url …`), as the image has no shell nor curl.

FROM golang:1.26 AS build
WORKDIR /src
# The whole workspace: the binary's module needs the others (go.work).
COPY . .
RUN --mount=type=cache,target=/go/pkg/mod \
    --mount=type=cache,target=/root/.cache/go-build \
    CGO_ENABLED=0 go build -trimpath -ldflags='-s -w' -o /comfyfleet ./services/comfyfleet

# distroless static: CA certificates (webhooks and input images over https) and time
# zones, no shell, no package manager; runs as nonroot (uid 65532).
FROM gcr.io/distroless/static-debian12:nonroot
COPY --from=build /comfyfleet /comfyfleet
# Numeric, so that Kubernetes can check runAsNonRoot.
USER 65532:65532
# `up` keeps its NATS store in ./.comfyfleet: the home of nonroot, which it may write.
WORKDIR /home/nonroot
EXPOSE 8080
ENTRYPOINT ["/comfyfleet"]
CMD ["up", "--http", "0.0.0.0:8080"]
