// kratos-session-bridge admin dashboard: live refresh without reloading the page.
// `data-refresh` seconds after each round the page fetches itself and swaps in the new
// <main>, unless the tab is hidden or the operator is using the page (focus in it, an
// open table of figures). When a round fails, the footer says since when nothing is new.
(function () {
  "use strict";
  var seconds = Number(document.body.getAttribute("data-refresh"));
  if (!seconds || !window.fetch || !window.DOMParser) return;
  var content = document.getElementById("content");

  function busy() {
    var active = document.activeElement;
    if (active && active !== document.body && active !== content && content.contains(active)) {
      return true;
    }
    return content.querySelector("details[open]") !== null;
  }

  function stale() {
    var footer = document.getElementById("updated");
    if (footer && !footer.hasAttribute("data-stale")) {
      footer.setAttribute("data-stale", "");
      footer.textContent = "Not updated since " + footer.getAttribute("data-at") +
        ": the bridge did not answer, or you were signed out. Reload to try again.";
    }
  }

  function round() {
    if (document.visibilityState !== "visible" || busy()) return Promise.resolve();
    return fetch(window.location.href, {
      credentials: "same-origin",
      headers: { "X-Requested-With": "fetch" },
      redirect: "manual"
    })
      .then(function (response) {
        if (!response.ok) throw new Error("refresh: " + response.status);
        return response.text();
      })
      .then(function (html) {
        var fresh = new DOMParser().parseFromString(html, "text/html");
        var main = fresh.getElementById("content");
        var updated = fresh.getElementById("updated");
        if (!main || busy()) return;
        content.replaceChildren.apply(content, Array.prototype.slice.call(main.childNodes));
        if (updated) document.getElementById("updated").replaceWith(updated);
      })
      .catch(stale);
  }

  function next() {
    window.setTimeout(function () { round().then(next, next); }, seconds * 1000);
  }
  next();
})();
