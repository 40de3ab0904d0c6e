"""State tracking: word problems over finite groups, the command that trains models on them
(``m2rnn-state-tracking``), its configs and analyses; results and how to reproduce them in
README.md."""
