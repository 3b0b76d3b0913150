"""Wire formats: each decodes its bodies into a `GatewayRequest` and encodes results
and stream events back into its own JSON and SSE (see `base.WireFormat`)."""
