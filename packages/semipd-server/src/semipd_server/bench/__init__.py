"""Benchmarks shipped with the server package as console scripts: they run wherever semipd-server is.

`serving` is `semipd-bench-serving`: an open-loop goodput sweep against any OpenAI-compatible server
(`serving_client` sends and times the requests, `serving_data` makes workloads and statistics, `serving_plots`
draws the PNGs with the optional `semipd-server[bench]` extra)."""
