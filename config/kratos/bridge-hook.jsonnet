// The body of Kratos's web_hook calls to the bridge (POST /hooks/kratos/<flow>).
// Ids and what Kratos saw, nothing else: the bridge reads the session itself from
// Kratos's admin API, and no trait, token or cookie leaves Kratos this way.
// ctx.session exists in login hooks only; first-factor logins carry the nil id.
function(ctx) {
  flow: { id: ctx.flow.id, type: ctx.flow.type },
  identity_id: if std.objectHas(ctx, 'identity') && ctx.identity != null then ctx.identity.id else null,
  session: if std.objectHas(ctx, 'session') && ctx.session != null then {
    id: ctx.session.id,
    aal: ctx.session.authenticator_assurance_level,
    methods: if ctx.session.authentication_methods == null then 0
             else std.length(ctx.session.authentication_methods),
  } else null,
}
