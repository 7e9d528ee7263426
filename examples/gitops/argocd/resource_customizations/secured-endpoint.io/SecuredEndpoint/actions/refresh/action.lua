-- A new value of secured-endpoint.io/refresh-requested-at makes the operator fetch one new token at once (the
-- old one stays until the new one is written). The annotation is not in Git, so this causes no drift; with
-- server-side apply it is owned by Argo CD's action, not by the application's field manager.
if obj.metadata.annotations == nil then
  obj.metadata.annotations = {}
end
obj.metadata.annotations["secured-endpoint.io/refresh-requested-at"] = os.date("!%Y-%m-%dT%H:%M:%SZ")
return obj
