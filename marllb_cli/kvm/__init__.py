"""KVM guests for `kind: kvm` testbeds: the Debian base image and per-guest seed disks (`image`)."""
