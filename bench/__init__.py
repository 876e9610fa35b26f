"""The benchmark suite behind `editrt bench`.

    cli.py               the `bench` subcommand: options, outputs (`add_bench_parser`, `main`)
    suite.py             runs the cases, assembles the result rows; the JSON schema
    cases.py             the registry: backends, `Case` / `Run`, the shared context, `--only` matching
    reposition_cases.py  the repositioning editor's rows (UNet, LoRA switch, VAE, SAM, passes, peers)
    elements_cases.py    the elements editor's rows (decoder UNet, content encoder, partition, render)
    runtime_cases.py     the scheduler's rows (eager loop vs CUDA graph) and the edit sessions'
    kernel_rows.py       the Triton kernels' rows, from kernel_cases.py
    kernel_cases.py      the kernels' inputs, baselines and work counts (beside the kernels)
    observe.py           what a row really ran: editrt kernel launches, CUDA graph replays, torch.compile
    timing.py            warm-up, rotating inputs, CUDA events / perf_counter, p50 / p90, peak memory
    report.py            terminal table, Markdown, plot, atomic writes, bench/results/
    cleanup_cases.py     the partition clean-up rows (scipy vs native ops), when present
    gpu_validate.sh      one command on a lent GPU (docs/gpu-validate.md): its stages on a 540 s budget
    gpu_validate.py      those stages: plan, budget, summary.json, the readers of their streamed results
    pytest_stream.py     pytest plugin: one JSON line per finished test (`-p editrt.bench.pytest_stream`)
    results/             committed runs, one JSON per device and date, and a README of the latest
"""
