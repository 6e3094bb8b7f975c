"""ckctl, the admin CLI: ``ctr``'s verbs over containerkitd's socket."""
