"""Model families (LlamaGen GPT c2i/t2i), image decoders and checkpoint loading. No Ray in here."""
