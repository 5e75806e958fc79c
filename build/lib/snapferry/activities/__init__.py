"""Every side effect of snapferry: hypervisor drivers, the copy engine, alerts."""
