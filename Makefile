# bmr: the README's commands. `make test` is what CI runs.
CARGO ?= cargo
BMR := target/release/bmr

.PHONY: all build deps test lint demo iso qemu-test kernel bench fuzz clean

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

# A Debian machine backs itself up and is recovered unattended in QEMU onto
# a different disk (tests/recovery.rs, its dissimilar scenario), timed.
demo: deps
	scripts/demo

# bmr's image path against dd, partclone and restic on a deterministic volume.
bench: deps build
	scripts/bench $(BMR) target/bench

# The rescue ISO (BIOS and UEFI, CD and USB stick) with Debian's kernel.
ISO := target/bmr-rescue.iso
iso: deps build
	kver=$$(scripts/fetch-debian-kernel) && \
	  $(BMR) mkrescue --kernel target/debian-kernel/boot/vmlinuz-$$kver \
	    --initramfs target/bmr-rescue.initrd --iso $(ISO)

# Every QEMU scenario in qemu-tests/scenarios, the long ones included.
qemu-test: deps
	BMR_QEMU_ALL=1 $(CARGO) test --locked --test qemu -- --nocapture --test-threads=1
	BMR_RECOVERY_ALL=1 $(CARGO) test --locked --test recovery -- --nocapture

# libFuzzer on the parsers of untrusted input (fuzz/), FUZZ_SECONDS each.
# cargo-fuzz wants a nightly compiler; RUSTC_BOOTSTRAP lets the stable one
# accept its flags. Findings land in fuzz/artifacts/.
FUZZ_SECONDS ?= 60
fuzz: deps
	command -v cargo-fuzz >/dev/null || $(CARGO) install cargo-fuzz --locked
	cd fuzz && for t in $$(RUSTC_BOOTSTRAP=1 $(CARGO) fuzz list); do \
	  RUSTC_BOOTSTRAP=1 $(CARGO) fuzz run -O $$t -- -max_total_time=$(FUZZ_SECONDS) -rss_limit_mb=2048 || exit 1; \
	done

# Optional, about an hour on two cores, not part of CI: kernel-config/README.md.
kernel:
	scripts/build-kernel

clean:
	$(CARGO) clean
