"""What runs where one node is, written once against `hosts.LocalHost`: the local controller calls it for
each namespace, and `marllb node` (`deploy.node.cli`) calls it on a real host or KVM guest.

    roles      routes, addresses, sysctls, nftables of a node's role (client, router, LB, server)
    server     a server's cgroup and Apache (`apache`, `cgroups`, `mediawiki`)
    lbs        an LB's dataplane and agent processes
    manifest   the record of everything made, written before it is made
    undo       the one teardown of a record

Imports only `hosts`, `topology`, `config` and the processes it starts: never a testbed kind.
"""
