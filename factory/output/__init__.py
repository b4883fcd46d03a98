"""The build's output, in one room: the write stage the workers run (`write`), the output store
the driver keeps (`store`: manifest, staging files, the shards' finalize) and the human-facing
report (`report`: progress lines, summary, dataset card, contact sheet). The product's shard schema
and label rule, which the trainers read too, stay in `core.shards`."""
