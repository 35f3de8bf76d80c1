"""Pure data and rules: specs, runner definitions, DAG compile, states, hashes. No I/O."""
