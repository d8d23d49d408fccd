# bmr: the README's commands. `make test` is what CI runs.
CARGO ?= cargo
BMR := target/release/bmr
DEMO := target/demo

.PHONY: all build deps test lint demo iso qemu-test kernel bench clean

all: build

deps:
	scripts/setup-deps

build:
	$(CARGO) build --release --locked

lint:
	$(CARGO) fmt --check
	$(CARGO) clippy --locked --all-targets -- -D warnings

# Unit tests need nothing special; integration tests run as root on loop devices.
test: deps lint
	$(CARGO) test --locked -- --test-threads=2

demo: deps build
	scripts/demo $(BMR) $(DEMO)

# bmr's image path against dd, partclone and restic on a deterministic volume.
bench: deps build
	scripts/bench $(BMR) target/bench

iso qemu-test kernel:
	@echo "make $@: arrives with the rescue, recovery and image issues; see README.md" >&2
	@exit 2

clean:
	$(CARGO) clean
