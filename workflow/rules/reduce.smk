# Reduce: the similarity store (seam of every select-side analysis), component selection on the
# selection queries, and random projections of the full gradient.


if plan.similarity_source(config) == "cache":

    rule similarity:
        """Per-component query x train dot products and squared norms for one query setting, from the gradient cache."""
        input:
            code=stage_code("similarity"),
            train=gradient_shards("train"),
            query_grads=gradient_shards("queries"),
            queries=QUERY_TABLE,
            bm25_candidates=plan.store_candidates(config),
        output:
            similarity="results/similarity/{setting}.h5",
        log:
            "logs/similarity/{setting}.log",
        benchmark:
            "benchmarks/similarity/{setting}.tsv"
        conda:
            ENV
        resources:
            **io_resources(),
        params:
            **stage_params("similarity"),
        script:
            STAGE

elif plan.shared_pass(config):

    rule similarity_projection_stream:
        """Every setting's similarity store and every projection of the full gradient, at every k and seed, from one pass over the model (exact, no cache)."""
        input:
            model=local(ATTRIBUTED_MODEL),
            code=stage_code("similarity_projection_stream"),
            train="results/data/train.parquet",
            queries=QUERY_TABLE,
        output:
            parts=expand("results/similarity/{setting}/part-0.h5", setting=SETTINGS),
            projection=expand("results/projection/{method}.h5", method=plan.projection_methods(config)),
            blocks=plan.projection_parts(config),
        log:
            "logs/similarity/stream-projections.log",
        benchmark:
            "benchmarks/similarity/stream-projections.tsv"
        conda:
            ENV
        threads: max_threads()
        resources:
            **model_resources("similarity_projection_stream", rows_of("train"), queries=queries_held),
        params:
            **stage_params("similarity_projection_stream", model=model_param(ATTRIBUTED_MODEL)),
        script:
            STAGE

else:

    rule similarity_stream:
        """One training shard of every setting's similarity store, streamed straight from the model in one pass (exact, no cache)."""
        input:
            model=local(ATTRIBUTED_MODEL),
            code=stage_code("similarity_stream"),
            train="results/data/train.parquet",
            queries=QUERY_TABLE,
            bm25_candidates=plan.store_candidates(config),
        output:
            parts=expand("results/similarity/{setting}/part-{{part}}.h5", setting=SETTINGS),
        log:
            "logs/similarity/stream-part-{part}.log",
        benchmark:
            "benchmarks/similarity/stream-part-{part}.tsv"
        conda:
            ENV
        threads: max_threads()
        resources:
            **model_resources("similarity_stream", rows_of("train"), queries=queries_held),
        params:
            **stage_params("similarity_stream", model=model_param(ATTRIBUTED_MODEL)),
        script:
            STAGE


if plan.similarity_source(config) == "stream":

    rule similarity_merge:
        """A setting's streamed similarity store: its shards summed (exact)."""
        input:
            code=stage_code("similarity_merge"),
            parts=expand("results/similarity/{{setting}}/part-{part}.h5", part=plan.similarity_parts(config)),
        output:
            similarity="results/similarity/{setting}.h5",
        log:
            "logs/similarity/{setting}-merge.log",
        benchmark:
            "benchmarks/similarity/{setting}-merge.tsv"
        conda:
            ENV
        resources:
            **io_resources(),
        params:
            **stage_params("similarity_merge"),
        script:
            STAGE


rule selection:
    """Per split: best single component, greedy forward selection, budgeted prefixes (selection queries)."""
    input:
        code=stage_code("selection"),
        similarity="results/similarity/{setting}.h5",
    output:
        selection="results/selection/{setting}.parquet",
    log:
        "logs/selection/{setting}.log",
    benchmark:
        "benchmarks/selection/{setting}.tsv"
    conda:
        ENV
    resources:
        **io_resources(),
    params:
        **stage_params("selection"),
    script:
        STAGE


if plan.similarity_source(config) == "cache":

    rule projection:
        """One projection method of the full gradient, at every k and seed."""
        input:
            code=stage_code("projection"),
            train=gradient_shards("train"),
            query_grads=gradient_shards("queries"),
        output:
            projection="results/projection/{method}.h5",
        log:
            "logs/projection/{method}.log",
        benchmark:
            "benchmarks/projection/{method}.tsv"
        conda:
            ENV
        resources:
            **io_resources(),
        params:
            **stage_params("projection"),
        script:
            STAGE

    rule project_selected:
        """Select-then-project: each split's greedy set, projected to every k with every seed."""
        input:
            code=stage_code("project_selected"),
            train=gradient_shards("train"),
            query_grads=gradient_shards("queries"),
            selection="results/selection/{setting}.parquet",
        output:
            projection="results/projection/select_then_project/{setting}.h5",
        log:
            "logs/projection/select_then_project-{setting}.log",
        benchmark:
            "benchmarks/projection/select_then_project-{setting}.tsv"
        conda:
            ENV
        resources:
            **io_resources(),
        params:
            **stage_params("project_selected"),
        script:
            STAGE

elif not plan.shared_pass(config):

    rule projection_stream:
        """Every projection method of the full gradient, at every k and seed, from one pass over the model (exact, no cache)."""
        input:
            model=local(ATTRIBUTED_MODEL),
            code=stage_code("projection_stream"),
            train="results/data/train.parquet",
            queries=QUERY_TABLE,
        output:
            projection=expand("results/projection/{method}.h5", method=plan.projection_methods(config)),
            blocks=plan.projection_parts(config),
        log:
            "logs/projection/stream.log",
        benchmark:
            "benchmarks/projection/stream.tsv"
        conda:
            ENV
        threads: max_threads()
        resources:
            **model_resources("projection_stream", samples_of("train", "queries")),
        params:
            **stage_params("projection_stream", model=model_param(ATTRIBUTED_MODEL)),
        script:
            STAGE


if plan.similarity_source(config) == "stream":

    rule project_selected_stream:
        """Select-then-project of every setting, summed from the selected components' blocks the pass kept (projection_stream or similarity_projection_stream; no pass over the model)."""
        input:
            code=stage_code("project_selected_stream"),
            blocks=plan.projection_parts(config),
            selection=expand("results/selection/{setting}.parquet", setting=SETTINGS),
        output:
            projection=expand("results/projection/select_then_project/{setting}.h5", setting=SETTINGS),
        log:
            "logs/projection/select_then_project-stream.log",
        benchmark:
            "benchmarks/projection/select_then_project-stream.tsv"
        conda:
            ENV
        resources:
            **io_resources(),
        params:
            **stage_params("project_selected_stream"),
        script:
            STAGE
