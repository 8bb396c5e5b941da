// Progressive enhancement for the pay page. Without JavaScript the saved-card form still pays.
// Every sentence shown here comes translated from the page (data- attributes); what went wrong in
// detail goes to the console, never to the customer.
(function () {
  "use strict";

  function said(element, name) { return (element && element.getAttribute("data-" + name)) || ""; }

  // One press is enough. While a payment is on its way the button says "Processing…" (aria-busy), a
  // live region says what is happening, and a second press does nothing. The button is not disabled,
  // so that keyboard focus stays on it rather than falling back to the top of the page.
  // `pressed`: the button that submitted (a form may have several: pay the balance, another amount…).
  function setBusy(form, busy, pressed) {
    var button = busy ? (pressed || form.querySelector("button[type=submit]")) : form.querySelector("button[aria-busy]");
    var status = form.querySelector("[role=status]");
    if (busy) {
      form.setAttribute("data-busy", "1");
      if (button) {
        if (!button.hasAttribute("data-label")) { button.setAttribute("data-label", button.textContent); }
        button.textContent = said(form, "processing") || button.textContent;
        button.setAttribute("aria-busy", "true");
        button.setAttribute("aria-disabled", "true");
      }
      if (status) { status.classList.remove("error"); status.textContent = said(form, "processing-status"); }
    } else {
      form.removeAttribute("data-busy");
      if (button) {
        if (button.hasAttribute("data-label")) { button.textContent = button.getAttribute("data-label"); }
        button.removeAttribute("aria-busy");
        button.removeAttribute("aria-disabled");
      }
    }
  }

  Array.prototype.forEach.call(document.querySelectorAll("form.pay"), function (form) {
    if (form.id === "new-card-form") { return; }  // its own handler below
    form.addEventListener("submit", function (event) {
      if (form.hasAttribute("data-busy")) { event.preventDefault(); return; }
      setBusy(form, true, event.submitter);
    });
  });

  // Coming back to this page from the browser's history: it can be pressed again.
  window.addEventListener("pageshow", function (event) {
    if (!event.persisted) { return; }
    Array.prototype.forEach.call(document.querySelectorAll("form.pay[data-busy]"), function (form) { setBusy(form, false); });
  });

  // Several saved cards: without JavaScript the button names no card (it could not follow the
  // choice); here it names the chosen one, now and whenever the choice changes.
  var payButton = document.getElementById("pay-button");
  function followChoice() {
    var chosen = document.querySelector("input[data-pay-label]:checked");
    if (chosen && payButton && !payButton.hasAttribute("aria-busy")) { payButton.textContent = chosen.getAttribute("data-pay-label"); }
  }
  Array.prototype.forEach.call(document.querySelectorAll("input[data-pay-label]"), function (radio) {
    radio.addEventListener("change", followChoice);
  });
  followChoice();

  // A new card: Stripe's card element; card data goes from this page to Stripe only. Stripe.js is
  // loaded from here, so that a slow network shows nothing alarming while it loads, and only a failed
  // load (its error event, or no answer in LOAD_TIMEOUT_MS) says the card form is not available.
  var LOAD_TIMEOUT_MS = 20000;
  var form = document.getElementById("new-card-form");
  if (!form) { return; }
  var needsJs = document.getElementById("new-card-needs-js");
  var unavailable = document.getElementById("new-card-unavailable");
  if (needsJs) { needsJs.hidden = true; }  // JavaScript runs: Stripe.js is on its way
  var status = document.getElementById("new-card-status");
  var button = document.getElementById("new-card-button");
  var stripe = null, card = null;

  function cardFormUnavailable(detail) {
    console.error("paylink: paying with a new card is not available:", detail);
    if (unavailable && !card) { unavailable.hidden = false; }  // saved cards still pay
  }

  function setUpCardForm() {
    if (typeof window.Stripe !== "function") { cardFormUnavailable("Stripe.js is not available"); return; }
    try {
      stripe = window.Stripe(form.getAttribute("data-publishable-key"), { locale: document.documentElement.lang || "auto" });
      card = stripe.elements().create("card");
      card.mount("#card-element");
    } catch (error) {
      card = null;
      cardFormUnavailable(error);
      return;
    }
    if (unavailable) { unavailable.hidden = true; }
    form.hidden = false;
  }

  if (typeof window.Stripe === "function") {
    setUpCardForm();
  } else {
    var script = document.createElement("script");
    var timer = window.setTimeout(function () { cardFormUnavailable("Stripe.js did not load in time"); }, LOAD_TIMEOUT_MS);
    script.src = form.getAttribute("data-stripe-js");
    script.async = true;
    script.addEventListener("load", function () { window.clearTimeout(timer); setUpCardForm(); });
    script.addEventListener("error", function () { window.clearTimeout(timer); cardFormUnavailable("Stripe.js failed to load"); });
    document.head.appendChild(script);
  }

  // What to tell the customer about a card Stripe refused, in the page's language.
  var DECLINES = ["card_declined", "insufficient_funds", "generic_decline", "do_not_honor", "lost_card", "stolen_card",
                  "fraudulent", "card_velocity_exceeded", "transaction_not_allowed", "pickup_card", "restricted_card"];
  function customerMessage(error) {
    var code = error && (error.decline_code || error.code);
    if (DECLINES.indexOf(code) !== -1) { return said(form, "declined"); }
    if (code === "expired_card") { return said(form, "expired"); }
    if (code === "incorrect_cvc" || code === "invalid_cvc") { return said(form, "cvc"); }
    // Stripe.js writes its messages about what was typed (an incomplete number…) for customers, in their language.
    if (error && error.type === "validation_error" && typeof error.message === "string" && error.message) { return error.message; }
    return said(form, "error");
  }

  function fail(message, detail) {
    if (detail) { console.error("paylink: paying with a new card failed", detail); }
    setBusy(form, false);
    status.textContent = message || said(form, "error");
    status.classList.add("error");
  }

  form.addEventListener("submit", function (event) {
    if (form.elements.setup_intent.value) { return; }  // the real submit (form.submit() fires no event)
    event.preventDefault();
    if (form.hasAttribute("data-busy") || !card) { return; }
    setBusy(form, true, event.submitter);
    status.textContent = said(form, "checking") || said(form, "processing-status");
    var body = new FormData();
    body.append("csrf", form.elements.csrf.value);
    // Asking for JSON: errors come back as {"error", "message"} (a person or a script that does not
    // ask gets the error pages instead, e.g. "Too many attempts" with 429).
    fetch(form.getAttribute("data-setup-url"), { method: "POST", body: body, credentials: "same-origin", headers: { Accept: "application/json" } })
      .then(function (response) {
        return response.json().then(function (data) { return { ok: response.ok, status: response.status, data: data || {} }; });
      })
      .then(function (reply) {
        if (!reply.ok || !reply.data.client_secret) {
          // Our server's own answers are translated sentences ("message", or "error" for the setup route).
          var told = reply.data.message || (/\s/.test(reply.data.error || "") ? reply.data.error : "");
          fail(told, reply);
          return null;
        }
        return stripe.confirmCardSetup(reply.data.client_secret, { payment_method: { card: card } }).then(function (result) {
          if (result.error) { fail(customerMessage(result.error), result.error); return; }
          form.elements.setup_intent.value = result.setupIntent.id;
          status.textContent = said(form, "processing-status");
          form.submit();
        });
      })
      .catch(function (error) { fail(said(form, "error"), error); });
  });
})();
