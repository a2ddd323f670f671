"""The kernel side: gtp5g patcher, module build/install, verify, tracer build, BPF loader, selftests."""
